"""Regenerate the small quickstart corpus in this folder (seeded, so the output is reproducible).

    python examples/data/make_corpus.py

Writes `stories.jsonl` (one JSON object per line, the document in "text"; lengths vary from a
paragraph to a few thousand words so long-document upsampling has something to act on) and
`essays.txt` (plain text, documents separated by blank lines). All text is produced by the small
grammar below; it is original to this project and free to redistribute under its license.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

NAMES = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Keiko", "Luca", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Samir", "Tilda", "Victor"]
PLACES = ["the harbour", "the old mill", "the market square", "the library", "the orchard",
          "the lighthouse", "the railway station", "the river bank", "the hill farm",
          "the observatory", "the bakery", "the school house", "the forest path", "the bridge"]
TOWNS = ["Aldmere", "Brightwater", "Coldharbour", "Dunmore", "Eastwick", "Fairhaven", "Glenrock",
         "Hollowell", "Ivybridge", "Kestrel Point"]
OBJECTS = ["a brass compass", "a folded map", "a wooden box", "a blue umbrella", "an old letter",
           "a basket of apples", "a lantern", "a notebook", "a silver key", "a pair of boots",
           "a jar of honey", "a small telescope", "a bundle of firewood", "a loaf of bread"]
WEATHER = ["The morning was grey and still", "Rain had fallen all night",
           "A cold wind came down from the hills", "The sun rose early over the roofs",
           "Fog lay thick across the water", "The afternoon was warm and bright",
           "Snow had covered the fields", "Clouds moved quickly across the sky"]
FEELINGS = ["curious", "tired", "hopeful", "uneasy", "cheerful", "patient", "restless", "calm"]
VERBS_PAST = ["walked to", "hurried towards", "wandered around", "waited near", "returned to",
              "searched", "looked across", "climbed up to"]
ACTIONS = ["counted the boats", "read the notices on the wall", "talked with the keeper",
           "wrote a few lines in a notebook", "watched the birds", "bought some bread",
           "mended a broken fence", "listened to the bells", "drew a quick sketch",
           "asked about the timetable", "helped carry the crates", "lit the lamps"]
TOPICS = {
    "rivers": ["A river carries water, sand and stones from high ground to the sea",
               "Over many years it cuts a valley into the rock",
               "Where the land is flat, the river slows down and bends from side to side",
               "Floods spread fine soil over the fields, which is why farms often grow along rivers",
               "Bridges, mills and towns gather at the places where a river is easy to cross"],
    "bread": ["Bread is made from flour, water, salt and yeast",
              "The yeast feeds on sugars in the dough and releases gas, which makes the dough rise",
              "Kneading stretches the gluten so that it can trap the gas",
              "A hot oven sets the crumb and browns the crust",
              "Bakers start long before dawn so that the loaves are ready in the morning"],
    "stars": ["On a clear night far from town lights, a few thousand stars can be seen",
              "Stars appear to turn around the pole because the Earth rotates",
              "Their colours hint at their temperatures: red stars are cooler than blue ones",
              "Sailors once steered by the stars when no land was in sight",
              "A small telescope shows the moons of Jupiter and the rings of Saturn"],
    "bees": ["Honey bees live in colonies of many thousands",
             "Worker bees collect nectar and pollen from flowers within a few miles of the hive",
             "They share the direction of good flowers by a dance",
             "Nectar is dried in wax cells until it becomes honey",
             "Many crops depend on bees and other insects to carry pollen"],
    "maps": ["A map shrinks a landscape onto a sheet of paper",
             "Contour lines join points of equal height, so close lines mean steep ground",
             "A scale bar tells how far a finger's width is on the ground",
             "Old maps often show roads that have since disappeared",
             "Reading a map well takes practice, patience and a good sense of direction"],
    "clocks": ["Early clocks used falling weights to drive their wheels",
               "A pendulum swings with a steady beat, which made clocks far more accurate",
               "Railways needed every station to keep the same time",
               "Watchmakers work with parts smaller than a grain of rice",
               "Today the most precise clocks count the vibrations of atoms"],
}
CONNECTIVES = ["Moreover", "In practice", "For this reason", "At the same time", "Even so",
               "As a result", "In many places", "Over the centuries"]


def story_paragraph(rng, hero, town):
    out = [f"{rng.choice(WEATHER)} when {hero} {rng.choice(VERBS_PAST)} {rng.choice(PLACES)}."]
    for _ in range(rng.randint(3, 7)):
        kind = rng.random()
        if kind < 0.35:
            out.append(f"{hero} {rng.choice(ACTIONS)} and felt {rng.choice(FEELINGS)}.")
        elif kind < 0.6:
            other = rng.choice(NAMES)
            out.append(f'"Have you seen {rng.choice(OBJECTS)}?" asked {other}. '
                       f'"Not since {rng.choice(["Monday", "the fair", "the storm", "last winter"])}," '
                       f"said {hero}.")
        elif kind < 0.8:
            n = rng.randint(2, 97)
            out.append(f"There were {n} people in {town} that day who remembered {rng.choice(PLACES)}.")
        else:
            out.append(f"Later {hero} {rng.choice(VERBS_PAST)} {rng.choice(PLACES)} "
                       f"carrying {rng.choice(OBJECTS)}.")
    return " ".join(out)


def story(rng, n_paragraphs):
    hero, town = rng.choice(NAMES), rng.choice(TOWNS)
    title = f"{hero} of {town}"
    return title + "\n\n" + "\n\n".join(story_paragraph(rng, hero, town) for _ in range(n_paragraphs))


def essay(rng):
    topic = rng.choice(sorted(TOPICS))
    facts = TOPICS[topic][:]
    rng.shuffle(facts)
    sents = []
    for i, fact in enumerate(facts[: rng.randint(3, 5)]):
        sents.append(fact + "." if i == 0 or rng.random() < 0.5 else f"{rng.choice(CONNECTIVES)}, {fact[0].lower()}{fact[1:]}.")
    return " ".join(sents)


def main():
    rng = random.Random(20261124)
    # Mostly short stories plus a few long ones (a long tail, as in real corpora).
    lengths = [rng.randint(1, 5) for _ in range(110)] + [rng.randint(30, 60) for _ in range(5)]
    rng.shuffle(lengths)
    with open(os.path.join(HERE, "stories.jsonl"), "w", encoding="utf-8") as f:
        for i, n in enumerate(lengths):
            f.write(json.dumps({"id": f"story-{i:04d}", "text": story(rng, n)}) + "\n")
    with open(os.path.join(HERE, "essays.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(essay(rng) for _ in range(220)) + "\n")


if __name__ == "__main__":
    main()
