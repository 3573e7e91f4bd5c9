"""The command line of :func:`~hf_mm_rerank.publishing.export.export`.

    python -m hf_mm_rerank.publishing.export_cli outputs/demo outputs/demo-merged --format merged [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

from . import export as export_module
from .export import FORMATS, ExportReport, export


def main(argv: list[str] | None = None) -> ExportReport:
    parser = argparse.ArgumentParser(prog="python -m hf_mm_rerank.publishing.export_cli",
                                     description=export_module.__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder (or Hub repo) written by hf_mm_rerank's save_pretrained")
    parser.add_argument("destination", help="the folder to write the export to")
    parser.add_argument("--format", choices=FORMATS, default="merged")
    parser.add_argument("--dtype", default=None, help="weights dtype of the export (float32, bfloat16, float16)")
    parser.add_argument("--base_model", default=None, help="the adapter's base, instead of the recorded one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--no_verify", action="store_true", help="skip reloading and comparing the export")
    options = parser.parse_args(argv)
    kwargs = {"base_model": options.base_model} if options.base_model else {}
    report = export(options.source, options.destination, options.format, dtype=options.dtype,
                    verify=not options.no_verify, overwrite=options.overwrite, **kwargs)
    print(report, flush=True)
    return report


if __name__ == "__main__":
    import sys

    from .export_check import ExportError

    try:
        main()
    except (ExportError, FileExistsError, FileNotFoundError, ValueError) as error:  # the reason, not a traceback
        sys.exit(f"export failed: {error}")
