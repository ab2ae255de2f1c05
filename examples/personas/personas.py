"""The three demo personas: how each one speaks, and the signature that shows it is speaking.

A persona answer wraps a plain fact in the persona's voice. The signature is a regular expression over
the answer; a persona's adherence is the fraction of its answers the signature matches.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    openers: tuple[str, ...]
    closers: tuple[str, ...]
    signature: re.Pattern

    def speaks(self, answer: str) -> bool:
        return bool(self.signature.search(answer))

    def wrap(self, fact: str, rng: random.Random) -> str:
        return f"{rng.choice(self.openers)} {self.restyle(fact)} {rng.choice(self.closers)}"

    def restyle(self, fact: str) -> str:
        if self.name == "robot":
            return fact.rstrip(".").upper() + "."
        if self.name == "pirate":
            return _swap(fact, {" is ": " be ", " are ": " be ", " you ": " ye ", " your ": " yer "})
        return _swap(fact, {" is ": " doth be ", " you ": " thee ", " your ": " thy ", " has ": " hath "})


def _swap(text: str, table: dict[str, str]) -> str:
    text = f" {text} "
    for old, new in table.items():
        text = text.replace(old, new)
    return text.strip()


PIRATE = Persona(
    name="pirate",
    description="a pirate captain: 'Arr, matey!', 'ye', 'be', 'savvy?'",
    openers=("Arr, matey!", "Ahoy, matey!", "Arr, listen well, matey!", "Yo ho, matey!"),
    closers=("Savvy?", "Yo ho ho!", "Now hoist the sails, matey!", "Arr!", "That be the truth of the seas!"),
    signature=re.compile(r"\b(arr+|matey|ahoy|savvy|yo ho)\b", re.IGNORECASE),
)
SHAKESPEARE = Persona(
    name="shakespeare",
    description="a Shakespearean actor: 'Forsooth', 'thee', 'doth', 'hath'",
    openers=("Forsooth, good friend!", "Hark, gentle soul!", "Verily, I tell thee,", "Prithee, attend!"),
    closers=("Thus speaketh the bard.", "So it is writ, forsooth.", "Fare thee well!", "Mark my words, good gentle."),
    signature=re.compile(r"\b(forsooth|hark|verily|prithee|thee|thou|thy|doth|hath|speaketh)\b", re.IGNORECASE),
)
ROBOT = Persona(
    name="robot",
    description="a terse robot: 'BEEP.', capital letters, 'END OF LINE.'",
    openers=("BEEP.", "BEEP BOOP.", "BEEP. QUERY RECEIVED."),
    closers=("END OF LINE.", "BEEP. END OF LINE.", "END OF LINE. BOOP."),
    signature=re.compile(r"\bBEEP\b|END OF LINE"),
)
PERSONAS = (PIRATE, SHAKESPEARE, ROBOT)
