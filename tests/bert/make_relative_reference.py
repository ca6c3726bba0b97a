"""Write the reference outputs of BERT with relative positions (transformers 4.56.2; version 5 dropped
them) for tests/bert/test_relative.py.

Run it in a separate environment with that version (the torch installed here is reused):

    python -m venv --system-site-packages /tmp/tf456
    /tmp/tf456/bin/pip install transformers==4.56.2
    /tmp/tf456/bin/python tests/bert/make_relative_reference.py

For each of relative_key and relative_key_query it saves, under tests/bert/data/<type>/, a tiny random
BertModel checkpoint (config.json + model.safetensors, the reference's own save_pretrained) and
expected.safetensors: the inputs (right-padded ids, attention mask, token types) and the reference's
outputs (last_hidden_state, pooler_output, hidden states and attention weights, eager attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

DATA = Path(__file__).parent / "data"
REQUIRED = "4.56.2"
COMMAND = "/tmp/tf456/bin/python tests/bert/make_relative_reference.py"

CONFIG = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=16,
    type_vocab_size=2,
    pad_token_id=0,
)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, CONFIG["vocab_size"], (3, 12), generator=g)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    for row, real in enumerate((12, 9, 5)):
        ids[row, real:] = 0
        mask[row, real:] = 0
        types[row, real // 2 : real] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def write(position_embedding_type: str) -> None:
    torch.manual_seed(1234)
    config = transformers.BertConfig(
        **CONFIG, position_embedding_type=position_embedding_type, attn_implementation="eager"
    )
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zero-initialised: randomise them so that none can hide
                p.normal_(0, 0.02)
            elif "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
            elif "distance_embedding" in name:  # large enough that a wrong distance shows in the outputs
                p.normal_(0, 1.0)
    folder = DATA / position_embedding_type
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    given = inputs()
    with torch.no_grad():
        out = model(**given, output_hidden_states=True, output_attentions=True)
    tensors = {f"input.{k}": v for k, v in given.items()}
    tensors["last_hidden_state"] = out.last_hidden_state
    tensors["pooler_output"] = out.pooler_output
    tensors.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    tensors.update({f"attentions.{i}": a for i, a in enumerate(out.attentions)})
    metadata = {"transformers": transformers.__version__, "torch": torch.__version__, "command": COMMAND}
    save_file(
        {k: v.detach().clone().contiguous() for k, v in tensors.items()},
        str(folder / "expected.safetensors"),
        metadata=metadata,
    )
    print(f"{folder}: {json.dumps(metadata)}")


def main() -> None:
    if transformers.__version__ != REQUIRED:
        raise SystemExit(f"needs transformers=={REQUIRED} (relative positions); this is {transformers.__version__}")
    for kind in ("relative_key", "relative_key_query"):
        write(kind)


if __name__ == "__main__":
    main()
