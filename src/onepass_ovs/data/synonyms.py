"""Synonym sets per training class, for GKC's text diversification (docs/methods.md section 4).

Three sources, merged by :func:`build_synonym_sets`:

- a JSON file the user gives, ``{"class name": ["synonym", ...], ...}``
  (:func:`read_synonym_json`);
- WordNet noun lemmas: every lemma of every noun synset of the class name
  (:func:`wordnet_synonyms`), read with nltk's WordNet reader from a WordNet 3.0
  database folder (Debian's ``wordnet-base`` installs one in ``/usr/share/wordnet``);
- a built-in set for the shapes world (:func:`shapes_world_synonyms`): colour and shape
  synonyms combined, "crimson ring" for "red circle".

A class's set always starts with its own name(s) (``"sofa, couch"`` gives both). Sets of
different classes are kept disjoint (a name claimed by an earlier class, or equal to
another class's own name, is dropped, with a warning): every per-image vocabulary must
name each class unambiguously.

Pure python (nltk imported only when WordNet is read).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .classes import DatasetError, class_synonyms

__all__ = [
    "SHAPES_WORLD_COLOUR_SYNONYMS",
    "SHAPES_WORLD_SHAPE_SYNONYMS",
    "WORDNET_LEXNAMES",
    "build_synonym_sets",
    "find_wordnet_dir",
    "read_synonym_json",
    "shapes_world_synonyms",
    "wordnet_synonyms",
]

logger = logging.getLogger("onepass_ovs.data")

#: Synonyms of the shapes world's six colours (the colour's own name first).
SHAPES_WORLD_COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime green"),
    "blue": ("blue", "azure", "navy blue"),
    "yellow": ("yellow", "golden", "lemon yellow"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "tangerine", "amber"),
}
#: Synonyms of the shapes world's five shapes (the shape's own name first).
SHAPES_WORLD_SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ring", "disc"),
    "square": ("square", "box", "quadrate"),
    "triangle": ("triangle", "trigon", "wedge"),
    "star": ("star", "pentagram", "asterisk"),
    "cross": ("cross", "plus sign", "plus"),
}
_BACKGROUND_SYNONYMS = ("background", "backdrop", "ground")

#: The 45 lexicographer files of WordNet 3.0 (``lexnames(5WN)``), in file-number order,
#: with their syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb). nltk's reader
#: needs this ``lexnames`` file, which Debian's ``wordnet-base`` does not install.
WORDNET_LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_WORDNET_FILES = ("index.noun", "data.noun")


# -- JSON ---------------------------------------------------------------------------------------


def read_synonym_json(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{"class name": ["synonym", ...]}`` from a JSON file, checked.

    Raises :class:`~onepass_ovs.data.DatasetError` naming the file for a missing or
    malformed file, a value that is not a list of non-empty strings, or a synonym with a
    comma (a comma separates names of one class in vocabularies).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"synonym file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read synonym file {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected an object {{class: [synonyms]}}, got {type(data).__name__}"
        )
    out: dict[str, list[str]] = {}
    for name, synonyms in data.items():
        if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
            raise DatasetError(f"{path}: the synonyms of {name!r} must be a list of strings")
        cleaned = [s.strip() for s in synonyms]
        for synonym in cleaned:
            if not synonym:
                raise DatasetError(f"{path}: empty synonym for {name!r}")
            if "," in synonym:
                raise DatasetError(f"{path}: synonym {synonym!r} of {name!r} contains a comma")
        out[str(name).strip()] = cleaned
    return out


# -- WordNet ------------------------------------------------------------------------------------


def find_wordnet_dir(candidates: Iterable[str | os.PathLike] | None = None) -> Path | None:
    """A WordNet 3.0 database folder (holding ``index.noun`` and ``data.noun``), or None.

    Looks in ``candidates`` if given, else ``$WORDNET_DIR``, ``$WNSEARCHDIR``,
    ``/usr/share/wordnet`` (Debian's ``wordnet-base``), ``/usr/local/share/wordnet``,
    ``/usr/share/wordnet/dict`` and ``<nltk data dir>/corpora/wordnet``.
    """
    if candidates is None:
        candidates = [os.environ.get("WORDNET_DIR"), os.environ.get("WNSEARCHDIR"),
                      "/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict",
                      Path.home() / "nltk_data" / "corpora" / "wordnet",
                      "/usr/share/nltk_data/corpora/wordnet"]  # fmt: skip
    for candidate in candidates:
        if not candidate:
            continue
        folder = Path(candidate).expanduser()
        if all((folder / name).is_file() for name in _WORDNET_FILES):
            return folder
    return None


def _reader_folder(folder: Path, cache_dir: Path | None) -> Path:
    """``folder`` itself when nltk can read it; otherwise (no ``lexnames`` file, as
    Debian's) a copy of it (~30 MB, made once) with the standard ``lexnames`` added. nltk's
    path sandbox refuses symbolic and hard links, hence a copy."""
    if (folder / "lexnames").is_file():
        return folder
    base = (
        cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onepass_ovs"
    )
    target = base / "wordnet-3.0"
    lexnames = "".join(
        f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n"
        for i, name in enumerate(WORDNET_LEXNAMES)
    )
    if (target / "lexnames").is_file() and all(
        (target / f.name).is_file() for f in folder.iterdir() if f.is_file()
    ):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for source in folder.iterdir():
        if not source.is_file():
            continue
        dest = target / source.name
        if dest.is_file() and dest.stat().st_size == source.stat().st_size:
            continue
        temp = target / f".{source.name}.tmp-{os.getpid()}"
        shutil.copyfile(source, temp)
        os.replace(temp, dest)
    temp = target / f".lexnames.tmp-{os.getpid()}"
    temp.write_text(lexnames)
    os.replace(temp, target / "lexnames")
    return target


def open_wordnet(
    folder: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
):
    """nltk's ``WordNetCorpusReader`` over a WordNet 3.0 folder (default:
    :func:`find_wordnet_dir`). Raises ``ImportError`` without nltk (``pip install
    'onepass-ovs[gkc]'``) and ``FileNotFoundError`` when no database is found."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:
        raise ImportError("WordNet synonyms need nltk: pip install 'onepass-ovs[gkc]'") from err
    found = find_wordnet_dir([folder] if folder is not None else None)
    if found is None:
        raise FileNotFoundError(
            f"no WordNet 3.0 database (index.noun + data.noun) in {folder}"
            if folder is not None
            else "no WordNet 3.0 database found: install one (Debian: apt-get install "
            "wordnet-base) or set WORDNET_DIR"
        )
    root = _reader_folder(found, Path(cache_dir) if cache_dir is not None else None)
    # nltk only reads folders under its data path (its path sandbox)
    for allowed in {str(root.resolve()), str(found.resolve())}:
        if allowed not in nltk.data.path:
            nltk.data.path.append(allowed)

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # nltk maps to its own downloaded "wordnet" corpus for multilingual data; the
            # English lemmas need no mapping (and that corpus may well be absent)
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return EnglishWordNet(str(root), None)


def wordnet_synonyms(
    names: Sequence[str],
    folder: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, list[str]]:
    """For each name, the lemmas of all WordNet noun synsets of it (underscores -> spaces,
    in WordNet's sense order, deduplicated, case-insensitively), the name itself first.

    A multi-word name is looked up joined by underscores (``"traffic light"`` ->
    ``traffic_light``); a name WordNet does not know maps to ``[name]``.
    """
    wordnet = open_wordnet(folder, cache_dir=cache_dir)
    out: dict[str, list[str]] = {}
    for name in names:
        lemmas = [name]
        query = "_".join(name.strip().split())
        for synset in wordnet.synsets(query, pos="n"):
            for lemma in synset.lemmas():
                lemmas.append(lemma.name().replace("_", " "))
        out[name] = _unique(lemmas)
    return out


# -- shapes world -------------------------------------------------------------------------------


def shapes_world_synonyms(class_names: Sequence[str]) -> dict[str, list[str]]:
    """The built-in synonyms of shapes-world classes ``"<colour> <shape>"`` and
    ``"background"``: every colour synonym x every shape synonym, the class's own name
    first ("red circle" -> "red circle", "red ring", ..., "scarlet disc"). Names that are
    not shapes-world classes are left out."""
    out: dict[str, list[str]] = {}
    for name in class_names:
        key = name.strip().lower()
        if key == "background":
            out[name] = list(_BACKGROUND_SYNONYMS)
            continue
        parts = key.split(" ", 1)
        if len(parts) != 2:
            continue
        colour, shape = parts
        if colour in SHAPES_WORLD_COLOUR_SYNONYMS and shape in SHAPES_WORLD_SHAPE_SYNONYMS:
            out[name] = _unique(
                [name]
                + [f"{c} {s}" for c in SHAPES_WORLD_COLOUR_SYNONYMS[colour]
                   for s in SHAPES_WORLD_SHAPE_SYNONYMS[shape]]
            )  # fmt: skip
    return out


# -- merging ------------------------------------------------------------------------------------


def _unique(names: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in names:
        key = name.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(name.strip())
    return out


def build_synonym_sets(
    class_names: Sequence[str],
    sources: Sequence[Mapping[str, Sequence[str]]] = (),
) -> list[list[str]]:
    """One synonym list per class, in class order: the class's own names (``"a, b"`` ->
    ``a``, ``b``), then each source's synonyms for it (a source is looked up by the full
    class string and by each of its names, case-insensitively), deduplicated.

    Sets are made disjoint: a synonym equal to another class's own name, or already in
    an earlier class's set, is dropped (logged). Synonyms with a comma raise ``ValueError``.
    """
    own = [class_synonyms(name) for name in class_names]
    owner: dict[str, int] = {}
    for index, names in enumerate(own):
        for name in names:
            owner.setdefault(name.lower(), index)
    lowered = [{k.strip().lower(): list(v) for k, v in source.items()} for source in sources]
    sets: list[list[str]] = []
    dropped: list[str] = []
    for index, (full, names) in enumerate(zip(class_names, own, strict=True)):
        candidates = list(names)
        for source in lowered:
            for key in [full.strip().lower(), *(n.lower() for n in names)]:
                candidates += source.get(key, [])
        kept = []
        for synonym in _unique(candidates):
            if "," in synonym:
                raise ValueError(f"synonym {synonym!r} of class {full!r} contains a comma")
            claimed = owner.get(synonym.lower(), index)
            if claimed != index:
                dropped.append(f"{synonym!r} ({full!r}; belongs to {class_names[claimed]!r})")
                continue
            owner[synonym.lower()] = index
            kept.append(synonym)
        sets.append(kept)
    if dropped:
        logger.warning(
            "dropped %d synonyms shared between classes: %s",
            len(dropped),
            ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
        )
    return sets
