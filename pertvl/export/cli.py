"""Subcommand `export`: the parser only; the handler imports lazily (no torch at parse time).

`pertvl export` needs torch (pertvl.export.onnx). The commands that apply an export (`pertvl
embed`, `pertvl similarity`) are registered by pertvl.evaluate.embed_cli.
"""

from __future__ import annotations

import argparse

from pertvl.cli import lazy_handler, positive_int, with_out_lock
from pertvl.export.int8 import parse_residual_layers

# --out is created by the export itself (it must not exist without --force): the lock sits beside it.
_export = with_out_lock(lazy_handler("pertvl.export.onnx", "cli_main"), beside=True)


def _residual_layers(text: str) -> tuple[str, ...]:
    try:
        return parse_residual_layers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export the trained encoders to ONNX (+ tokenizer, manifest, parity check)",
        description="Export both towers of a trained DualEncoder to ONNX files that plain onnxruntime "
        "runs, with a manifest (pertvl_export.json) and a built-in torch-vs-onnxruntime parity check.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="training run folder (loads RUN_DIR/final)")
    src.add_argument("--checkpoint", help="a save_pretrained folder, or a DeepSpeed checkpoint folder "
                     "(then --config or the run's config.yaml gives the model config)")
    p.add_argument("--config", help="run config.yaml for a DeepSpeed --checkpoint (default: found next to it)")
    p.add_argument("--out", required=True, help="export folder to create (e.g. export/NAME)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--image-size", type=positive_int,
                   help="side of the square input image (default: the model's / run's image size, else 224)")
    p.add_argument("--max-length", type=positive_int,
                   help="word pieces per report (default: the run's data.max_length, else 128)")
    p.add_argument("--quantize", choices=["int8"], help="also write dynamically quantized int8 towers")
    p.add_argument("--int8-residual", type=_residual_layers, default="ffn-in", metavar="LAYERS",
                   help="with --quantize int8: text layers (qkv, attn-out, ffn-in, ffn-out, comma list, or "
                   "'none') given a residual int8 pass (docs/EXPORT.md)")
    p.add_argument("--no-parity", action="store_true", help="skip the torch-vs-onnxruntime parity check")
    p.add_argument("--text-graph", choices=["auto", "unpadded", "fused", "traced"], default="auto",
                   help="text tower graph (docs/EXPORT.md); auto: unpadded when supported, else fused")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed in fp32 (1e-4)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(handler=_export)
