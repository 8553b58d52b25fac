"""A progress bar on stderr: rich if it imports, else tqdm, else a line per case."""

from __future__ import annotations

import sys


class _Plain:
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def describe(self, text: str) -> None:
        print(f"[{100 * self.done / max(1, self.total):5.1f}%] {text}", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        print("[100.0%] done", file=sys.stderr, flush=True)


class _Tqdm:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, unit="it", dynamic_ncols=True, leave=False)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Rich:
    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=Console(stderr=True), transient=True)
        self.p.start()
        self.task = self.p.add_task("starting", total=total)

    def describe(self, text: str) -> None:
        self.p.update(self.task, description=text)

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)

    def close(self) -> None:
        self.p.stop()


class _Null:
    def __init__(self, total: int):
        pass

    def describe(self, text: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(total: int, enabled: bool = True):
    if not enabled:
        return _Null(total)
    interactive = sys.stderr.isatty()
    for cls in ((_Rich, _Tqdm) if interactive else ()):
        try:
            return cls(total)
        except Exception:
            continue
    return _Plain(total)
