"""Draw the home page's figure, nbs/images/home.png, from the real LIDC-IDRI sample (patient LIDC-IDRI-0001).

Needs `LUNGSEG_SAMPLE_DIR` (see the README). The PNG is committed: the site and the README show it without the sample.
Panels: the CT slice with most consensus voxels (lung window, nodule boxed); the four readers' outlines and the 50%
consensus mask around the nodule; the same slice as the U-Net sees it after `lungseg preprocess` (lung window, lung
crop, 256x256) with the mask it learns.
Usage: python scripts/home_figure.py [--out nbs/images/home.png]
"""
import argparse, os, sys
from pathlib import Path
os.environ.setdefault('MPLBACKEND', 'Agg')
import numpy as np
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
from lung_tumor_seg.core import sample_dir, read_series, load_hu
from lung_tumor_seg.annotations import parse_lidc_xml
from lung_tumor_seg.masks import series_masks, show_masks
from lung_tumor_seg.preprocessing import preprocess_volume, preprocess_mask

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', type=Path, default=ROOT/'nbs'/'images'/'home.png')
    args = ap.parse_args(argv)
    root = sample_dir(required=True)
    xml = next((root/'LIDC-IDRI-0001').rglob('*.xml'))
    series = read_series(xml.parent)
    sm = series_masks(parse_lidc_xml(xml), series)
    hu = load_hu(series)
    k = int(np.argmax((sm.consensus > 0).sum(axis=(1, 2))))
    mask = (sm.consensus > 0).astype(np.uint8)
    image, meta = preprocess_volume(hu, series.geometry.spacing_mm, None, mask_zyx=mask)
    stored_mask = preprocess_mask(mask, meta)
    ks = int(np.argmax(stored_mask.sum(axis=(1, 2))))

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.7), gridspec_kw=dict(wspace=0.05))
    axes[0].imshow(hu[k], cmap='gray', vmin=-1350, vmax=150)
    yx = np.argwhere(sm.consensus[k] > 0); (y0, x0), (y1, x1) = yx.min(0), yx.max(0)
    c = 48
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    axes[0].add_patch(Rectangle((cx - c, cy - c), 2*c, 2*c, fill=False, ec='#ffd400', lw=1.2))
    axes[0].set_title("CT slice of LIDC-IDRI-0001\n(lung window)", fontsize=9)
    show_masks(hu, sm, slice_index=k, crop_px=c, ax=axes[1])
    axes[1].set_title("each radiologist's outline,\n50% consensus filled", fontsize=9)
    axes[2].imshow(image[ks], cmap='gray', vmin=0, vmax=1)
    axes[2].contour(stored_mask[ks], levels=[0.5], colors='#ff7f0e', linewidths=1.2)
    h, w = image.shape[1:]
    axes[2].set_title(f"training input (lung crop, {h}\u00d7{w})\nand its mask", fontsize=9)
    for ax in axes: ax.axis('off')
    fig.text(0.5, 0.06, "Real data: LIDC-IDRI (TCIA, CC BY 3.0; Armato et al. 2011). Labels and input made by lungseg annotations, masks, preprocess.",
             ha='center', fontsize=7.5, color='#555555')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches='tight'); plt.close(fig)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
