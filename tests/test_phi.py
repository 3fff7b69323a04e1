"""No identifier reaches an output nobody asked it in: raw ids, names and file names planted in the
source, the source's absolute path and the salt are searched for in every file an ingest, a report
and a job package write (dataset, manifest, predictions, report, logs, package)."""
from __future__ import annotations

import csv
import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from diffkd.runtime import jobs
from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import default_salt_path, ingest
from diffkd.evaluate.report import ReportInputs, write_report

PATIENTS = {"A": ["MRN48213", "MRN55102", "MRN60871", "MRN71234"], "B": ["MRN80011", "MRN80012", "MRN80013"]}
NAMES = ["Smith", "Okonkwo", "Lindqvist", "Fairweather", "Quintero", "Abernathy", "Nakashima"]


def hospital_export(root: Path, center: str) -> Path:
    """Images named after the patient (as PACS exports often are) and a CSV with MRNs and names."""
    rng = np.random.default_rng(ord(center))
    rows = []
    for i, mrn in enumerate(PATIENTS[center]):
        name = NAMES[i + (4 if center == "B" else 0)]
        for view in ("cc", "mlo"):
            file = f"{mrn}_{name}/{mrn}_{name}_{view}.png"
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / file)
            rows.append({"file": file, "patient_id": mrn, "case_id": f"ACC{mrn[3:]}{view}", "Patient Name":
                         f"{name}^Jane", "label": "upgrade" if i % 2 else "DCIS", "age": 40 + i})
    first = f"{PATIENTS[center][0]}_{NAMES[4 if center == 'B' else 0]}"
    (root / first / "broken.png").write_bytes(b"\x89PNG broken")
    rows.append({"file": f"{first}/broken.png", "patient_id": PATIENTS[center][0],
                 "case_id": "ACC-broken", "Patient Name": "Smith^Jane", "label": "DCIS", "age": 40})
    with open(root / "clinical.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def every_byte(path: Path) -> bytes:
    """A file's bytes, plus every value of a Parquet file decoded (compression would hide strings)."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        data += str(table.schema.metadata).encode()
        data += b"\n".join(v if isinstance(v, bytes) else str(v).encode()
                           for column in table.columns for v in column.to_pylist())
    return data


def test_no_identifier_reaches_any_output(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    home = tmp_path / "home" / "user"
    sources = {c: hospital_export(home / "exports" / f"hospital_{c}", c) for c in PATIENTS}
    ds_path = tmp_path / "shared" / "ds"
    reports = [ingest(src, c, ds_path, quarantine=home / "quarantine") for c, src in sources.items()]
    assert [r.quarantined for r in reports] == [1, 1] and all(r.written for r in reports)

    ds = ImageDataset(ds_path)
    meta = ds.metadata().to_pandas()
    rng = np.random.default_rng(0)
    preds = pd.concat([meta.assign(model=m, prob=rng.random(len(meta)),
                                   split=np.where(meta.center == "B", "test", "val"))
                       for m in ("student_kd", "teacher")])[["case_id", "patient_id", "center", "split", "label",
                                                             "model", "prob"]]
    files = write_report(tmp_path / "run", preds, ReportInputs(
        title="phi check", dataset={"name": "ds", "path": str(ds_path), "external": ["B"]}))
    (tmp_path / "run" / "diffkd.log").write_text(caplog.text)

    project = tmp_path / "project"
    for rel in ("diffkd/__init__.py", "pyproject.toml", "configs/run.yaml"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x = 1\n")
    os.symlink(home / "exports", project / "exports")
    (project / "exports_copy").mkdir()
    for p in sources["A"].rglob("*"):
        if p.is_file():
            (project / "exports_copy" / p.name).write_bytes(p.read_bytes())
    (project / ".ds.salt").write_bytes(default_salt_path(ds).read_bytes())
    package = jobs.build_package(project, tmp_path)

    outputs: dict[str, bytes] = {}
    for root in (ds_path, tmp_path / "run"):
        for path in root.rglob("*"):
            if path.is_file():
                outputs[str(path.relative_to(tmp_path))] = every_byte(path)
    with zipfile.ZipFile(package) as zf:
        for name in zf.namelist():
            outputs[f"package:{name}"] = name.encode() + zf.read(name)
    assert files.index.exists() and any(k.endswith("predictions.parquet") for k in outputs)

    identifiers = [*PATIENTS["A"], *PATIENTS["B"], *NAMES, "Jane", "ACC48213", default_salt_path(ds).read_text().strip()]
    identifiers += [p.stem for src in sources.values() for p in src.rglob("*.png")]
    found = {(ident, where) for ident in identifiers for where, data in outputs.items()
             if ident.encode() in data or ident.lower().encode() in data.lower()}
    # the user's own folders: not in what is stored or shared (the log, printed for the user, may name them)
    paths = [str(home), str(sources["A"]), str(tmp_path)]
    found |= {(path, where) for path in paths for where, data in outputs.items()
              if path.encode() in data and not where.endswith(".log")}
    print(f"PHI: {len(outputs)} output files, {len(set(identifiers + paths))} identifiers, {len(found)} found")
    assert not found, "\n".join(map(str, sorted(found)))
    quarantine = home / "quarantine" / "rejected-A.PHI.csv"
    assert "MRN48213" in quarantine.read_text()  # the one file that holds raw ids, as its name says
