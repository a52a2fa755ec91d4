"""Class names: the Kaggle archive's Italian folder names and the English ones we use.

The archive ships a ``translate.py`` with this dictionary; we never import or run it
(code from a downloaded archive is not ours to execute), so the mapping lives here.
"""

from __future__ import annotations

ANIMALS10 = {
    "cane": "dog",
    "cavallo": "horse",
    "elefante": "elephant",
    "farfalla": "butterfly",
    "gallina": "chicken",
    "gatto": "cat",
    "mucca": "cow",
    "pecora": "sheep",
    "ragno": "spider",
    "scoiattolo": "squirrel",
}


def english_label(folder: str, class_set: str) -> str | None:
    """The English class of a folder, or None when it is not one of ``class_set``.

    ``animals10`` accepts the Italian folder names and, for users who renamed them, the
    English ones; ``folders`` takes any folder name as its class.
    """
    if class_set == "folders":
        return folder
    name = folder.lower()
    if name in ANIMALS10:
        return ANIMALS10[name]
    if name in ANIMALS10.values():
        return name
    return None
