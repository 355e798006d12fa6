"""The lca dir, one home: its records and verification (`parts`), its claim, and the resume state of an
unfinished compute (`resume`). An lca dir is data too: what a compute writes is sealed, and verified
whenever it is read.

    meta.json            sealed JSON, written last: the settings, the losses, and every part
    progress{tag}.json   sealed JSON, one per process while unfinished: the parts so far, the next
                         step, the evaluations done, the totals file (the resume state)
    totals{tag}-N.safetensors   the per-parameter totals at the last flush
    steps/ tensors/ params/ examples/ example_steps/ tokens/   parquet parts
    dense/               safetensors parts (--dense)
"""

from replay.lcadir.parts import (
    DENSE_DIR,
    FRAME_DIRS,
    META,
    PROGRESS_RE,
    LcaDirDamaged,
    Part,
    check_part,
    check_parts,
    claim_lca_dir,
    frame_files,
    is_lca_dir,
    not_an_lca_dir,
    parts_of,
    read_sealed,
    verify,
    write_json,
    write_part,
)

__all__ = ["DENSE_DIR", "FRAME_DIRS", "META", "PROGRESS_RE", "LcaDirDamaged", "Part", "check_part", "check_parts",
           "claim_lca_dir", "frame_files", "is_lca_dir", "not_an_lca_dir", "parts_of",
           "read_sealed", "verify", "write_json", "write_part"]
