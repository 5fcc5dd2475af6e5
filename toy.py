"""toy.py: the whole ZUTIS pipeline learns, end to end, on a laptop CPU in minutes.

A procedurally generated world (toy/world.py: 64x64 images of ten shape categories on cluttered
backgrounds) stands in for the web, ImageNet/PASS and VOC. A tiny CLIP (toy/tiny_clip.py) is pre-trained
from scratch on a captioned stream of it, then the real stages run through their real entry points
(toy/run.py):

    world     -> toy_out/world/{index/, VOC2012/, categories.txt, hidden/}
    tiny CLIP -> toy_out/tiny_clip.pt (a plain CLIP state dict: clip_model.load reads it)
    build_archive.py --arch toy_out/tiny_clip.pt --k 200          -> toy_out/archive/archive.json
    pseudo_label.py --saliency boundary                            -> toy_out/masks/
    train.py --crop 64 ... (and --no_stop_grad for the ablation)   -> toy_out/train*/ckpt.pt
    evaluate.py --bench voc (--nms hard / none; --model maskclip)  -> toy_out/eval_*/metrics.json
    -> toy_out/results.md (table), results.json, grid.png (GT | MaskCLIP | ZUTIS), how_it_works/ (figures)

Nothing the generator knows (labels, masks) reaches a training stage: the index pool is a folder
of anonymous JPEGs, the labels live in toy_out/world/hidden/ and are read only by the report
(toy/report.py) for zero-shot accuracy, retrieval precision and pseudo-mask IoU.

Commands (CPU only; a GPU is used by the stages when present):
    python toy.py                                         # full run
    python toy.py --quick                                 # the CI run: fewer images and steps
    python toy.py --quick --check_floors toy/floors.json  # exit 1 if a metric is below its floor
A killed run continues when the same command is rerun: finished stages are skipped and the others
continue their own partial work. docs/toy.md explains the results.
"""
import common
from toy.run import main

if __name__ == "__main__":
    common.run_main(lambda: main(__doc__))
