"""The dataset contract: one Parquet row per image (docs/dataset.md).

Everything downstream of ingest reads these column names and types; importers must produce exactly
this schema. Clinical columns are declared once here, in `CLINICAL_SCHEMA`, so the importer, the
phantom, the fusion heads and the baselines agree on names, types and allowed values.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_VERSION = 1

# The outcome is binary; each dataset names its two classes (label 0, label 1) in its manifest
# (`diffkd ingest --label-names`). The default names are the DCIS-upgrade study's: 1 = upgraded to
# invasive at surgery (the positive class).
NUM_LABELS = 2
DEFAULT_LABEL_NAMES = ("DCIS", "upgrade")
# Spellings a user's CSV may carry for the label, lower-cased: any dataset's, then the DCIS study's.
GENERIC_LABEL_ALIASES = {"0": 0, "negative": 0, "1": 1, "positive": 1}
DCIS_LABEL_ALIASES = {
    "dcis": 0, "pure dcis": 0, "stays dcis": 0, "non-upgrade": 0, "no": 0,
    "upgrade": 1, "upgraded": 1, "idc": 1, "invasive": 1, "yes": 1,
}
MODALITIES = ("us", "us_doppler", "mammo")

BIRADS_LEVELS = ("2", "3", "4a", "4b", "4c", "5", "6")
LESION_TYPES = ("mass", "non_mass", "not_visible", "calcification")


@dataclass(frozen=True)
class ClinicalColumn:
    name: str
    kind: str  # "float" | "int" | "bool" | "category"
    low: float | None = None  # valid range for numeric columns (inclusive)
    high: float | None = None
    levels: tuple[str, ...] = ()  # allowed values for categories, ordered where order matters
    aliases: tuple[str, ...] = ()  # other CSV header spellings, matched case-insensitively
    description: str = ""

    @property
    def arrow_type(self) -> pa.DataType:
        return {"float": pa.float32(), "int": pa.int32(), "bool": pa.bool_(), "category": pa.string()}[self.kind]


CLINICAL_SCHEMA: tuple[ClinicalColumn, ...] = (
    ClinicalColumn("age", "float", 18, 100, aliases=("age_years", "patient_age"), description="years at biopsy"),
    ClinicalColumn("lesion_size_mm", "float", 1, 150, aliases=("size_mm", "lesion_size", "size"),
                   description="largest lesion diameter on imaging, mm"),
    ClinicalColumn("birads", "category", levels=BIRADS_LEVELS, aliases=("bi-rads", "bi_rads", "birads_category"),
                   description="BI-RADS assessment category"),
    ClinicalColumn("lesion_type", "category", levels=LESION_TYPES, aliases=("type", "lesion"),
                   description="mass / non-mass / not visible on US / calcifications only"),
    ClinicalColumn("palpable", "bool", aliases=("palpable_mass",), description="clinically palpable"),
    ClinicalColumn("axillary_node_suspicious", "bool", aliases=("suspicious_node", "axillary_node"),
                   description="suspicious axillary lymph node on imaging"),
    ClinicalColumn("nuclear_grade", "int", 1, 3, aliases=("grade", "biopsy_grade"),
                   description="nuclear grade at core biopsy (1-3)"),
    ClinicalColumn("microcalcifications", "bool", aliases=("calcifications", "calcs"),
                   description="microcalcifications visible"),
)
CLINICAL_COLUMNS = tuple(c.name for c in CLINICAL_SCHEMA)


def clinical_column(name: str) -> ClinicalColumn:
    for col in CLINICAL_SCHEMA:
        if col.name == name:
            return col
    raise KeyError(f"unknown clinical column {name!r}; known: {', '.join(CLINICAL_COLUMNS)}")


def normalize_birads(value: object) -> str | None:
    """'4A', '4a', 'BI-RADS 4c', 4 -> canonical lower-case level, None for missing; ValueError otherwise."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "nan", "none", "na", "n/a"):
        return None
    for prefix in ("bi-rads", "birads", "bi rads", "category", "cat"):
        if text.startswith(prefix):
            text = text[len(prefix):].strip(" :-")
    if text.endswith(".0"):
        text = text[:-2]
    if text == "4":  # an unsubdivided 4 is treated as the middle sub-category
        text = "4b"
    if text not in BIRADS_LEVELS:
        raise ValueError(f"BI-RADS value {value!r} is not one of {', '.join(BIRADS_LEVELS)} (or 4 / 4A-4C spellings)")
    return text


def birads_rank(value: object) -> float:
    """A BI-RADS category as an ordinal number, its rank in BIRADS_LEVELS (2 -> 0, 3 -> 1, 4a -> 2, ...
    6 -> 6), for scores and ordered predictors; NaN where missing; ValueError for an unknown category."""
    level = normalize_birads(value)
    return math.nan if level is None else float(BIRADS_LEVELS.index(level))


def check_label_names(names) -> tuple[str, str]:
    """("NEG", "POS") from a pair or "NEG,POS"; ValueError unless two distinct, non-empty names."""
    parts = [p.strip() for p in names.split(",")] if isinstance(names, str) else [str(p).strip() for p in names]
    if len(parts) != NUM_LABELS or not all(parts) or parts[0].lower() == parts[1].lower():
        raise ValueError(f"label names {names!r}: give two different names, label 0 first (the negative "
                         "class), then label 1 (the positive class), e.g. --label-names benign,malignant")
    if any(p.lower() in ("skip", "none", "-") or "," in p or "=" in p for p in parts):
        raise ValueError(f"label names {names!r}: 'skip', 'none', '-', ',' and '=' are reserved; choose other names")
    return parts[0], parts[1]


def label_aliases(names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> dict[str, int]:
    """Lower-cased label spellings -> 0/1 for a dataset whose outcomes are `names`: the names, 0/1,
    negative/positive, and the DCIS study's spellings when the names are the default ones."""
    aliases = dict(GENERIC_LABEL_ALIASES)
    if tuple(names) == DEFAULT_LABEL_NAMES:
        aliases.update(DCIS_LABEL_ALIASES)
    aliases.update({names[0].lower(): 0, names[1].lower(): 1})
    return aliases


def parse_label(value: object, names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> int:
    """A label cell or folder name -> 0/1, for a dataset whose outcomes are `names` (label 0, label 1)."""
    key = str(value).strip().lower()
    if key.endswith(".0"):
        key = key[:-2]
    aliases = label_aliases(names)
    if key not in aliases:
        raise ValueError(f"label {value!r} is not recognised; use {names[0]}/{names[1]} or 0/1 "
                         f"(accepted: {', '.join(sorted(aliases))})")
    return aliases[key]


BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("case_id", pa.string(), nullable=False),
    pa.field("patient_id", pa.string(), nullable=False),  # salted hash, never the raw id
    pa.field("center", pa.string(), nullable=False),  # stored only as the hive partition key (center=<C>/)
    pa.field("modality", pa.string(), nullable=False),
    pa.field("label", pa.int8(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # PNG, gray 8 or 16 bit, original size
    pa.field("mask", pa.binary()),  # lesion mask PNG or null
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("spacing_mm", pa.float32()),
)
TAIL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("synthetic", pa.bool_(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
)


def arrow_schema() -> pa.Schema:
    clinical = [pa.field(c.name, c.arrow_type) for c in CLINICAL_SCHEMA]
    return pa.schema([*BASE_FIELDS, *clinical, *TAIL_FIELDS])


def stored_schema() -> pa.Schema:
    """The columns a Parquet file holds: every row column but `center`, which its partition path gives."""
    schema = arrow_schema()
    return schema.remove(schema.get_field_index("center"))


# Columns a model needs besides pixels; `image`/`mask` bytes are dropped once decoded.
METADATA_COLUMNS = ("case_id", "patient_id", "center", "modality", "label", "synthetic", *CLINICAL_COLUMNS)


@dataclass
class ClinicalEncoding:
    """Fixed-length numeric encoding of the clinical columns for fusion heads and conditioning.

    Numeric values are standardised with fixed reference scales (not fitted, so train and external
    centers are encoded identically); categories are one-hot; every column gets a missing flag.
    """

    columns: tuple[str, ...] = CLINICAL_COLUMNS
    scales: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "age": (55.0, 12.0), "lesion_size_mm": (18.0, 12.0), "nuclear_grade": (2.0, 0.8)})

    @property
    def names(self) -> list[str]:
        out: list[str] = []
        for name in self.columns:
            col = clinical_column(name)
            out += [f"{name}={lvl}" for lvl in col.levels] if col.kind == "category" else [name]
            out.append(f"{name}_missing")
        return out

    @property
    def width(self) -> int:
        return len(self.names)

    def encode_row(self, row: dict) -> list[float]:
        out: list[float] = []
        for name in self.columns:
            col = clinical_column(name)
            value = row.get(name)
            missing = value is None or (isinstance(value, float) and value != value)
            if col.kind == "category":
                out += [float(not missing and value == lvl) for lvl in col.levels]
            elif missing:
                out.append(0.0)
            elif col.kind == "bool":
                out.append(float(bool(value)))
            else:
                mean, std = self.scales.get(name, (0.0, 1.0))
                out.append((float(value) - mean) / std)
            out.append(float(missing))
        return out
