"""Join the LM that ``bench/gpu.py`` pretrained on a GPU into a pretrained-LM folder, the layout
the ``pretrain`` stage writes, so that a workspace reuses it (``pretrain.reuse.fwd: {path:
...}``, docs/pretrained.md) for LM fine-tuning and classifiers on this machine.

    python bench/gpu_lm.py --returned DIR --tokenizer TOKENIZER.model --out FOLDER

--returned holds what the device run wrote (``gpu.json`` and ``lm.pt.partN``); --tokenizer is
the ``tokenizer.model`` of the workspace whose Wikipedia tokens it was trained on. The weights
come back in fp16 and are stored in fp32; ``training.json`` gives the perplexity that
``gpu.py`` measured on exactly those rounded weights.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.pretrained import check_lm  # noqa: E402
from tasks.training import MODEL_FILE, TRAINING_FILE  # noqa: E402
from ulmfit.checkpoint import save_model  # noqa: E402
from ulmfit.config import from_dict  # noqa: E402
from ulmfit.errors import InputError  # noqa: E402
from ulmfit.model import AWDLSTMConfig, LanguageModel  # noqa: E402
from ulmfit.tokenizer import Tokenizer  # noqa: E402


def join(returned: Path, tokenizer_path: Path, out: Path) -> Path:
    returned_report = json.loads((returned / "gpu.json").read_text(encoding="utf-8"))
    report = returned_report["pretrain"]
    parts = sorted(returned.glob("lm.pt.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    blob = b"".join(part.read_bytes() for part in parts)
    if hashlib.sha256(blob).hexdigest() != report["weights_sha256"]:
        raise InputError(returned, "the joined lm.pt.part* files are not the weights gpu.py wrote",
                         fix="copy every part back again")  # fmt: skip
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.identity != report["tokenizer_identity"]:
        raise InputError(tokenizer_path, "not the tokenizer of the tokens the LM was trained on",
                         fix="pass the workspace's data/tokenizer/tokenizer.model")  # fmt: skip
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    config = from_dict(AWDLSTMConfig, saved["config"])
    model = LanguageModel(config)
    model.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()})
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_path, out / "tokenizer.model")
    extra = {"trained_on": "bench/gpu.py", "weights": "fp16, stored as fp32"}
    save_model(out / MODEL_FILE, model, kind="lm", config=saved["config"],
               tokenizer_identity=tokenizer.identity, extra=extra)  # fmt: skip
    summary = {
        "steps": report["steps"], "metrics": report["fp16_valid"], "history": report["history"],
        "tokens_trained": report["tokens_trained"], "train_tokens": report["train_tokens"],
        "train_documents": report["train_documents"], "wall_seconds": report["wall_seconds"],
        "device": returned_report["environment"],
    }  # fmt: skip
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    check_lm(out, str(out), "", {})  # what pretrain.reuse will check
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--returned", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(join(args.returned, args.tokenizer, args.out))


if __name__ == "__main__":
    main()
