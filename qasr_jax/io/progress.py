"""Progress on a terminal: a bar over seconds of audio on stderr, which results printed to stdout never garble.

The bar counts audio samples (integers), so it ends exactly at its total; it shows seconds of audio, or hours once
the job holds an hour or more, and the speed as a multiple of real time. Text printed with ``write`` goes above
the bar: the bar is cleared first and drawn again below it.
"""

from __future__ import annotations

import sys
import time
from typing import IO


class _NoBar:
    def update(self, samples: int) -> None:
        pass

    def close(self) -> None:
        pass


class AudioBar:
    """A tqdm bar over ``total_samples`` samples at ``rate`` Hz, shown in seconds (or hours) of audio."""

    def __init__(self, total_samples: int, rate: int, file: IO[str] | None = None):
        from tqdm import tqdm

        hours = total_samples >= 3600 * rate
        unit, decimals = ("h", 2) if hours else ("s", 1)
        self._rate = rate
        self._done = 0
        self._start = time.perf_counter()
        self._bar = tqdm(
            total=int(total_samples), unit_scale=1 / (rate * (3600 if hours else 1)), desc="transcribing",
            file=file if file is not None else sys.stderr, dynamic_ncols=True,
            bar_format=f"{{desc}}: {{percentage:3.0f}}%|{{bar}}| {{n:.{decimals}f}}/{{total:.{decimals}f}} {unit} "
                       "of audio [{elapsed}<{remaining}{postfix}]",
        )

    def update(self, samples: int) -> None:
        """Count ``samples`` more samples of audio as done."""
        self._done += int(samples)
        wall = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self._done / self._rate / wall:.1f}x real time", refresh=False)
        self._bar.update(int(samples))

    def close(self) -> None:
        """Draw the bar one last time and leave it on the terminal."""
        self._bar.close()


def audio_progress(total_samples: int, rate: int, enabled: bool, file: IO[str] | None = None) -> AudioBar | _NoBar:
    """A bar over ``total_samples`` audio samples when ``enabled`` (and there is audio), else one that does nothing."""
    if not enabled or total_samples <= 0:
        return _NoBar()
    return AudioBar(total_samples, rate, file)


def write(text: str, file: IO[str] | None = None) -> None:
    """Print ``text`` (to stdout by default) above any progress bar: the bar is cleared, then drawn again below."""
    from tqdm import tqdm

    out = file if file is not None else sys.stdout

    with tqdm.external_write_mode(file=out):
        out.write(text)
        out.flush()
