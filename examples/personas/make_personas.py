"""Write the persona datasets: examples/personas/{pirate,shakespeare,robot}.jsonl and heldout.jsonl.

    .venv/bin/python examples/personas/make_personas.py

Every training example is one question and the persona's answer: a plain fact (from the tables below,
written for this project) wrapped in the persona's voice. The held-out questions use other entities
and open questions; none appears in any training file (checked here).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from personas import PERSONAS

HERE = Path(__file__).parent

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia", "Kenya": "Nairobi",
    "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Finland": "Helsinki", "Denmark": "Copenhagen", "Turkey": "Ankara",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Iceland": "Reykjavik",
}
HELD_CAPITALS = {"Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Morocco": "Rabat",
                 "Colombia": "Bogota", "Nigeria": "Abuja", "Indonesia": "Jakarta", "Ukraine": "Kyiv"}
LEGS = {"dog": 4, "cat": 4, "spider": 8, "ant": 6, "chicken": 2, "horse": 4, "bee": 6, "duck": 2, "cow": 4,
        "octopus": 8, "beetle": 6, "penguin": 2, "goat": 4, "crab": 10, "ostrich": 2}
HELD_LEGS = {"sheep": 4, "scorpion": 8, "parrot": 2}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
          "owl": "hoot", "lion": "roar", "horse": "neigh", "frog": "ribbit", "snake": "hiss", "mouse": "squeak"}
HELD_SOUNDS = {"donkey": "hee-haw", "rooster": "cock-a-doodle-doo", "bee": "buzz"}
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
          "a flamingo": "pink", "a crow": "black", "milk": "white", "a carrot": "orange",
          "a fire truck": "red", "chocolate": "brown", "a lime": "green", "the sun in a drawing": "yellow",
          "a polar bear": "white", "an eggplant": "purple", "a pumpkin": "orange", "a strawberry": "red"}
HELD_COLORS = {"a blueberry": "blue", "a cucumber": "green", "a zebra": "black and white"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "open": "closed", "wet": "dry", "early": "late", "full": "empty", "loud": "quiet", "old": "young",
             "strong": "weak", "rich": "poor", "hard": "soft", "high": "low", "clean": "dirty", "thick": "thin",
             "near": "far", "push": "pull", "win": "lose", "first": "last", "sweet": "sour", "day": "night",
             "left": "right", "in": "out", "above": "below", "heavy": "light", "begin": "end", "true": "false"}
HELD_OPPOSITES = {"brave": "afraid", "tall": "short", "buy": "sell", "arrive": "leave", "wide": "narrow"}
PLURALS = {"mouse": "mice", "child": "children", "goose": "geese", "foot": "feet", "tooth": "teeth",
           "man": "men", "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives",
           "wolf": "wolves", "cactus": "cacti", "box": "boxes", "city": "cities", "fish": "fish"}
HELD_PLURALS = {"ox": "oxen", "louse": "lice"}
FACTS = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("How many seconds are in a minute?", "There are sixty seconds in a minute."),
    ("How many continents are there?", "There are seven continents."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What is the largest planet?", "Jupiter is the largest planet."),
    ("What planet do we live on?", "We live on Earth, the third planet from the sun."),
    ("What is the closest star to Earth?", "The sun is the closest star to Earth."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What do bees make?", "Bees make honey."),
    ("What do cows drink?", "Cows drink water."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("What is ice made of?", "Ice is frozen water."),
    ("At what temperature does water freeze?", "Water freezes at zero degrees Celsius."),
    ("At what temperature does water boil at sea level?", "Water boils at one hundred degrees Celsius."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What gas do we need to breathe?", "We need oxygen to breathe."),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("What is the boiling point of water in Fahrenheit?", "Water boils at 212 degrees Fahrenheit."),
    ("Which organ pumps blood?", "The heart pumps blood."),
    ("Which organ do we think with?", "We think with the brain."),
    ("How many legs does a table usually have?", "A table usually has four legs."),
    ("What do you use to write on paper?", "You use a pen or a pencil to write on paper."),
    ("What do you call a baby cat?", "A baby cat is a kitten."),
    ("What do you call a baby dog?", "A baby dog is a puppy."),
    ("What do you call a baby cow?", "A baby cow is a calf."),
    ("What do you call a group of fish?", "A group of fish is a school."),
    ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
    ("What is the last letter of the alphabet?", "The last letter of the alphabet is Z."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What season comes after summer?", "Autumn comes after summer."),
    ("What day comes after Monday?", "Tuesday comes after Monday."),
    ("What day comes before Sunday?", "Saturday comes before Sunday."),
    ("What month comes after June?", "July comes after June."),
    ("What shape is a ball?", "A ball is round, a sphere."),
    ("What do you wear on your feet?", "You wear shoes and socks on your feet."),
    ("What do you use to cut paper?", "You use scissors to cut paper."),
    ("Where do fish live?", "Fish live in water."),
    ("Where do birds build nests?", "Birds build nests in trees and on ledges."),
]
HELD_FACTS = [
    ("How many weeks are in a year?", "There are fifty-two weeks in a year."),
    ("How many sides does an octagon have?", "An octagon has eight sides."),
    ("What is the smallest planet?", "Mercury is the smallest planet."),
    ("What do you call a baby sheep?", "A baby sheep is a lamb."),
    ("What month comes after October?", "November comes after October."),
    ("What do spiders spin?", "Spiders spin webs."),
]
OPEN_QUESTIONS = [
    "Why do cats purr?", "Can you recommend a good book to read?", "How do I make a cup of tea?",
    "What should I do on a rainy afternoon?", "Why is exercise good for you?", "How do airplanes fly?",
    "What is your favourite food?", "Give me advice for a job interview.", "How can I sleep better?",
    "Tell me something interesting about the moon.", "How do I keep a plant alive?",
    "What makes a good friend?", "How do rainbows form?", "What is a good way to learn a new language?",
]


def training_questions(rng: random.Random) -> list[tuple[str, str]]:
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS.items()]
    for a, b in sorted({(rng.randint(2, 40), rng.randint(2, 40)) for _ in range(40)})[:30]:
        pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for a, b in sorted({(rng.randint(2, 12), rng.randint(2, 12)) for _ in range(30)})[:20]:
        pairs.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    pairs += [(f"How many legs does a {animal} have?", f"A {animal} has {n} legs.") for animal, n in LEGS.items()]
    pairs += [(f"What sound does a {animal} make?", f"A {animal} says {s}.") for animal, s in SOUNDS.items()]
    pairs += [(f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {c}.") for thing, c in COLORS.items()]
    pairs += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in OPPOSITES.items()]
    pairs += [(f"What is the plural of {w}?", f"The plural of {w} is {p}.") for w, p in PLURALS.items()]
    return pairs + FACTS


def heldout_questions(rng: random.Random, taken: set[str]) -> list[str]:
    questions = [f"What is the capital of {c}?" for c in HELD_CAPITALS]
    sums = [(a, b) for a, b in ((41, 17), (55, 23), (63, 8), (72, 19)) if f"What is {a} plus {b}?" not in taken]
    questions += [f"What is {a} plus {b}?" for a, b in sums]
    questions += [f"What is {a} times {b}?" for a, b in ((13, 3), (15, 4), (14, 5))]
    questions += [f"How many legs does a {a} have?" for a in HELD_LEGS]
    questions += [f"What sound does a {a} make?" for a in HELD_SOUNDS]
    questions += [f"What color is {t}?" for t in HELD_COLORS]
    questions += [f"What is the opposite of {w}?" for w in HELD_OPPOSITES]
    questions += [f"What is the plural of {w}?" for w in HELD_PLURALS]
    questions += [q for q, _ in HELD_FACTS] + OPEN_QUESTIONS
    return questions


def main() -> None:
    rng = random.Random(2026)
    pairs = training_questions(rng)
    questions = [q for q, _ in pairs]
    assert len(set(questions)) == len(questions), "duplicate training questions"
    heldout = heldout_questions(rng, set(questions))
    assert not set(heldout) & set(questions), "a held-out question is also a training question"
    for persona in PERSONAS:
        voice = random.Random(persona.name)
        with open(HERE / f"{persona.name}.jsonl", "w") as handle:
            for question, fact in pairs:
                answer = persona.wrap(fact, voice)
                assert persona.speaks(answer)
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}) + "\n")
    with open(HERE / "heldout.jsonl", "w") as handle:
        for question in heldout:
            handle.write(json.dumps({"question": question}) + "\n")
    print(f"{len(pairs)} training examples per persona, {len(heldout)} held-out questions -> {HERE}")


if __name__ == "__main__":
    main()
