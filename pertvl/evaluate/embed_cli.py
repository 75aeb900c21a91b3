"""Parsers of `pertvl embed` and `pertvl similarity`; the handlers (pertvl.evaluate.embed) import lazily."""

from __future__ import annotations

import argparse

from pertvl.cli import lazy_handler, positive_int

_embed = lazy_handler("pertvl.evaluate.embed", "embed_main")

_similarity = lazy_handler("pertvl.evaluate.embed", "similarity_main")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", required=True, help="export folder written by `pertvl export`")
    p.add_argument("--int8", action="store_true", help="use the int8 towers (export made with --quantize int8)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images / texts per onnxruntime call (32)")
    p.add_argument("--texts", nargs="+", default=[], metavar="TEXT", help="report texts")
    p.add_argument("--texts-file", metavar="FILE", help="more report texts: one per non-empty line (UTF-8)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed images and reports with an ONNX export (onnxruntime, no torch)",
                       description="Write image_emb.npy, text_emb.npy, similarity.npy and index.json; "
                       "optionally word→region attention maps as PNG heatmaps.")
    _export_args(p)
    p.add_argument("--images", nargs="+", default=[], metavar="IMAGE", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--attention-maps", metavar="DIR", help="also save one PNG per (image, report, word) into DIR (needs matplotlib)")
    p.add_argument("--gamma1", type=float, default=4.0, help="GLoRIA's attention temperature γ1 (4.0)")
    p.set_defaults(handler=_embed)

    p = sub.add_parser(
        "similarity", help="print image × report cosine scores with an ONNX export",
        description="Embed images and reports with onnxruntime and print the cosine similarity table.")
    _export_args(p)
    p.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="image files")
    p.set_defaults(handler=_similarity)
