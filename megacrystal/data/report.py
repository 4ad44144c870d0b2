"""The end report of `megacrystal prepare`: a markdown table per dataset and a PNG of document lengths."""
from __future__ import annotations

import threading
from pathlib import Path

_matplotlib_import: threading.Thread | None = None


def _import_matplotlib() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def import_plotting_in_background() -> None:
    """Start importing matplotlib on a helper thread, so its import (a third of a second of one core) overlaps the
    tokenizing instead of adding to the end of the run. Call it after the caller's own imports: matplotlib shares
    no module with the data path but numpy, so the two threads never wait on each other's import locks."""
    global _matplotlib_import
    if _matplotlib_import is None:
        _matplotlib_import = threading.Thread(target=_import_matplotlib, name="import-matplotlib")
        _matplotlib_import.start()


def _row(name: str, m: dict) -> str:
    r = m["records"]
    return (f"| {name} | {m['documents']:,} | {m['tokens']:,} | {m['text_bytes'] / 1e6:,.1f} | "
            f"{m['tokens_per_byte']:.3f} | {m['duplicates_removed']:,} | {r['bad']:,} | {r['filtered']:,} | "
            f"{len(m['shards'])} |")


def write_report(out_dir: Path, metas: dict[str, dict]) -> list[Path]:
    """Write `<out_dir>/prepare-report.md` and `prepare-lengths.png`; return their paths."""
    lines = ["# Prepared datasets", "",
             "| dataset | documents | tokens | text MB | tokens/byte | duplicates removed | bad records | "
             "filtered out | shards |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(name, m) for name, m in metas.items()]
    bad = [(name, e) for name, m in metas.items() for e in m["records"]["examples"]]
    if bad:
        lines += ["", "First bad records skipped:", ""] + [f"- {name}: `{e}`" for name, e in bad]
    md = out_dir / "prepare-report.md"
    md.write_text("\n".join(lines) + "\n")
    return [md, _plot(out_dir / "prepare-lengths.png", metas)]


def _plot(path: Path, metas: dict[str, dict]) -> Path:
    if _matplotlib_import is not None:
        _matplotlib_import.join()
    _import_matplotlib()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in metas.items():
        bins = m["length_bins"]
        counts = m["length_histogram"]
        total = max(sum(counts), 1)
        labels = [f"{b:,}" if b < 1024 else f"{b // 1024}k" for b in bins]
        ax.plot(range(len(bins)), [c / total for c in counts], marker="o", label=f"{name} ({total:,} docs)")
    ax.set_xticks(range(len(labels)), [f">={x}" for x in labels], rotation=45, fontsize=8)
    ax.set_xlabel("document length (tokens, incl. EOS)")
    ax.set_ylabel("share of documents")
    ax.set_title("Document lengths per dataset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
