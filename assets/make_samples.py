"""Write the app's example images: six digits from the test split of the default dataset.

    python assets/make_samples.py            # -> assets/samples/digit-<class>.png

The images are the exact 16 px test-split pixels the default model is evaluated on (the
digits preset's image size and split seed), saved as PNG and named by their true class, so
the app's examples are images the model never trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "source"))  # run from anywhere, like the scripts in source/


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults listed, and the docstring's examples kept as written."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "assets" / "samples"), help="output folder")
    parser.add_argument("--count", type=int, default=6, help="images, one per class")
    args = parser.parse_args(argv)
    from torchvision.transforms import v2

    from config import PRESETS, Config
    from preprocessing import load_digits_splits

    test = load_digits_splits(Config.from_dict(PRESETS["digits"]())).test
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, target in enumerate(test.targets):  # the first test image of each class
        name = test.classes[target]
        path = out / f"digit-{name}.png"
        if path in written or len(written) >= args.count:
            continue
        v2.functional.to_pil_image(test.images[index]).save(path, optimize=True)
        written.append(path)
    print(f"wrote {len(written)} images to {out}/: {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
