"""Tests for evaluate.py, benchmarks.py, visualize.py and bench.py's `infer`: every reader on a tiny dataset
written here in the exact on-disk layout, the metrics on hand-computed cases (against the official
evaluators' definitions), the pipeline with an oracle, MaskCLIP and a tiny ZUTIS end to end, external
proposals, the --images demo, and the one-line errors.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import conftest
import benchmarks
import categories
import common
import evaluate
import visualize
from common import UserError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- writers

def save_jpg(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def voc_scene(k):
    """[32, 48] class and object maps: one or two objects with 255 borders (VOC's void outline)."""
    cls, obj = np.zeros((32, 48), np.uint8), np.zeros((32, 48), np.uint8)
    cls[4:16, 4:20], obj[4:16, 4:20] = 15, 1  # person
    if k % 2 == 0:
        cls[18:30, 24:44], obj[18:30, 24:44] = 12, 2  # dog
    for a in (cls, obj):  # 1-pixel void border around every object, as VOC draws them
        edge = np.zeros_like(a, bool)
        edge[3, 3:21] = edge[16, 3:21] = edge[3:17, 3] = edge[3:17, 20] = True
        a[edge] = 255
    return cls, obj


def write_voc(root, n_train=2, n_val=2):
    names = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    return conftest.write_voc(root, [(n, np.random.default_rng(k).integers(0, 255, (32, 48, 3), dtype=np.uint8),
                                      *voc_scene(k)) for k, n in enumerate(names)], n_train)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "VOCdevkit" / "VOC2012"
    write_voc(str(root))
    return str(root)


# ----------------------------------------------------------------------------- readers

def test_voc_reader(voc_root):
    b = benchmarks.read_bench("voc", voc_root)
    assert len(b.samples) == 4 and b.categories == categories.VOC and b.ignore_index == 255
    assert len(benchmarks.read_bench("voc", voc_root, split="val").samples) == 2
    parent = os.path.dirname(os.path.dirname(voc_root))  # the folder holding VOCdevkit/VOC2012
    assert [s["name"] for s in benchmarks.read_bench("voc", parent, split="train").samples] == ["2007_000000", "2007_000001"]
    s = b.samples[0]
    sem = b.load_semantic(s)
    assert sem.shape == (32, 48) and set(np.unique(sem)) == {0, 12, 15, 255}
    inst = b.load_instances(s, sem)
    assert sorted(l for _, l in inst) == [12, 15] and sum(m.sum() for m, _ in inst) == 12 * 16 + 12 * 20
    assert len(b.load_instances(b.samples[1], b.load_semantic(b.samples[1]))) == 1


def test_coco2017_reader(tmp_path):
    root = tmp_path / "coco2017"
    save_jpg(f"{root}/val2017/000000000139.jpg", 20, 30)
    m = np.full((20, 30), 255, np.uint8)  # unlabeled
    m[:5] = 0        # person (COCO id 1 -> PNG 0) -> label 1
    m[5:10] = 12     # stop sign (COCO id 13 -> PNG 12) -> contiguous 12
    m[10:15] = 122   # a stuff class -> background
    m[15:18] = 89    # toothbrush (COCO id 90) -> 80
    os.makedirs(f"{root}/stuffthingmaps_trainval2017/val2017")
    Image.fromarray(m).save(f"{root}/stuffthingmaps_trainval2017/val2017/000000000139.png")
    b = benchmarks.read_bench("coco2017", str(tmp_path))
    assert len(b.samples) == 1 and b.samples[0]["id"] == 139 and b.coco_gt is None
    sem = b.load_semantic(b.samples[0])
    assert (sem[:5] == 1).all() and (sem[5:10] == 12).all() and (sem[10:15] == 0).all() and (sem[15:18] == 80).all()
    assert (sem[18:] == 255).all() and categories.COCO[12] == "stop sign" and categories.COCO[80] == "toothbrush"
    assert b.cat_ids[categories.COCO.index("dog")] == 18


def test_coco20k_reader(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    ims = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 8, "width": 8} for i in (9, 25, 30)]
    rle = benchmarks.mask_to_rle(np.ones((8, 8), bool))
    anns = [{"id": k, "image_id": i, "category_id": c, "segmentation": rle, "area": 64, "bbox": [0, 0, 8, 8], "iscrowd": 0}
            for k, (i, c) in enumerate([(9, 1), (25, 17), (30, 1)], 1)]  # 17 = cat, an unseen class
    os.makedirs(f"{root}/annotations")
    with open(f"{root}/annotations/instances_train2014.json", "w") as f:
        json.dump({"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}]}, f)
    with open(f"{root}/coco_20k_filenames.txt", "w") as f:
        f.write("train2014/COCO_train2014_000000000009.jpg\ntrain2014/COCO_train2014_000000000025.jpg\n")
    os.makedirs(f"{root}/train2014")
    b = benchmarks.read_bench("coco20k", str(tmp_path))
    assert [s["id"] for s in b.samples] == [9, 25] and len(b.coco_gt["annotations"]) == 2
    assert os.path.isfile(f"{root}/annotations/instances_train2014_sel20k.json")
    monkeypatch.setattr(benchmarks, "build_sel20k", lambda *a: pytest.fail("sel20k rebuilt"))
    u = benchmarks.read_bench("coco20k", str(root), unseen=True)  # built by the first read: read back, not rebuilt
    assert len(u.categories) == 16 and "cat" in u.categories and "person" not in u.categories
    assert [s["id"] for s in u.samples] == [25] and 17 in u.eval_cat_ids


def test_coca_reader(tmp_path, capsys):
    root = tmp_path / "coca"
    for cat, n in (("Accordion", 2), ("Yellow duck", 1)):
        for i in range(n):
            save_jpg(f"{root}/image/{cat}/{i}.jpg", 10, 12, i)
            m = np.zeros((10, 12), np.uint8)
            m[2:6, 3:9] = 255
            os.makedirs(f"{root}/binary/{cat}", exist_ok=True)
            Image.fromarray(m).save(f"{root}/binary/{cat}/{i}.png")
    b = benchmarks.read_bench("coca", str(tmp_path))
    assert len(b.samples) == 3 and len(b.categories) == 81
    sem = b.load_semantic(b.samples[2])
    assert set(np.unique(sem)) == {0, categories.COCA.index("Yellow duck")} and (sem > 0).sum() == 24
    assert "warning" not in capsys.readouterr().err
    m = np.zeros((10, 12), np.uint8)  # the official rule: 255 -> the category, other values kept as they are
    m[0, :4], m[1, :2] = 255, 7
    Image.fromarray(m).save(f"{root}/binary/Accordion/0.png")
    sem = b.load_semantic(b.samples[0])
    assert (sem[0, :4] == categories.COCA.index("Accordion")).all() and (sem[1, :2] == 7).all() and sem.sum() == 4 * sem[0, 0] + 14
    assert "Accordion/0.png has values other than 0 and 255" in capsys.readouterr().err
    os.makedirs(f"{root}/image/not a class")
    with pytest.raises(UserError, match="not a CoCA category"):
        benchmarks.read_bench("coca", str(root))


def test_imagenet_s_reader(tmp_path):
    root = tmp_path / "ImageNet-S" / "ImageNetS919"
    save_jpg(f"{root}/validation/n01440764/ILSVRC2012_val_00000293.JPEG", 10, 10)
    save_jpg(f"{root}/test/n01440764/ILSVRC2012_val_00000001.JPEG", 10, 10)
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:4, :, 0], rgb[:4, :, 1] = 600 % 256, 600 // 256      # class 600
    rgb[8:, :, 0], rgb[8:, :, 1] = 1000 % 256, 1000 // 256    # ignore
    os.makedirs(f"{root}/validation-segmentation/n01440764")
    Image.fromarray(rgb).save(f"{root}/validation-segmentation/n01440764/ILSVRC2012_val_00000293.png")
    b = benchmarks.read_bench("imagenet_s919", str(tmp_path))
    assert len(b.samples) == 1 and b.ignore_index == 1000 and b.max_size == 1024 and len(b.categories) == 920
    assert b.metrics == ("imagenet_s",)
    sem = b.load_semantic(b.samples[0])
    assert (sem[:4] == 600).all() and (sem[4:8] == 0).all() and (sem[8:] == 1000).all()
    t = benchmarks.read_bench("imagenet_s919", str(root), split="test")
    assert len(t.samples) == 1 and t.load_semantic is None and t.metrics == ("server_pngs",)


def test_cub_reader(tmp_path):
    root = tmp_path / "CUB_200_2011"
    rels = ["001.Black_footed_Albatross/a_1.jpg", "001.Black_footed_Albatross/a_2.jpg", "002.Laysan_Albatross/b_1.jpg"]
    for k, r in enumerate(rels):
        save_jpg(f"{root}/images/{r}", 12, 12, k)
        m = np.zeros((12, 12), np.uint8)
        m[3:9, 3:9], m[0, 0] = 255, 100  # a soft annotator-disagreement pixel stays background
        os.makedirs(os.path.dirname(f"{tmp_path}/segmentations/{r}"), exist_ok=True)
        Image.fromarray(m).save(f"{tmp_path}/segmentations/{r[:-4]}.png")
    with open(f"{root}/images.txt", "w") as f:
        f.write("".join(f"{i + 1} {r}\n" for i, r in enumerate(rels)))
    with open(f"{root}/train_test_split.txt", "w") as f:
        f.write("1 0\n2 1\n3 0\n")
    b = benchmarks.read_bench("cub", str(tmp_path), cub_text="breed")
    assert [s["id"] for s in b.samples] == [1, 3] and b.sample_categories is not None
    assert b.samples[1]["text"] == "Laysan Albatross" and b.categories == ["background", "bird"]
    sem = b.load_semantic(b.samples[0])
    assert sem.sum() == 36 and sem[0, 0] == 0
    assert len(benchmarks.read_bench("cub", str(root), split="train").samples) == 1


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="unknown benchmark"):
        benchmarks.read_bench("kitti", str(tmp_path))
    with pytest.raises(UserError, match="data root not found.*JPEGImages"):
        benchmarks.read_bench("voc", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="voc data not found"):
        benchmarks.read_bench("voc", str(tmp_path))


# ----------------------------------------------------------------------------- metrics

def test_miou_hand_computed():
    """Official running_score: ignored pixels dropped on both sides, mean over present classes."""
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])
    conf = benchmarks.confusion(gt, pred, 5)
    assert conf[:5].sum() == 6 and conf[5].tolist() == [0, 0, 0, 2, 0]  # the last row: predictions on ignore
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 1, gt 2, pred 1 -> 1/2
    # class 3 is predicted only on ignored pixels and class 4 never appears: both absent -> excluded
    m = benchmarks.semantic_metrics(conf, ["a", "b", "c", "d", "e"])
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert m["per_class_iou"]["d"] is None and m["per_class_iou"]["e"] is None
    conf2 = benchmarks.confusion(np.array([0, 0]), np.array([0, 1]), 2)  # predicted but absent from GT: IoU 0
    assert benchmarks.semantic_metrics(conf2, ["a", "b"])["mIoU"] == pytest.approx(100 * (0.5 + 0) / 2)
    assert benchmarks.confusion(np.array([0, 3]), np.array([0, 0]), 5, ignore=3)[5, 0] == 1  # the ignore value itself


def imagenet_s_case():
    """10 x 20 = 200 pixels: class 1 on 10 (5%: S, its upper edge), class 2 on 12 (6%: MS), the ignore
    value 1000 on 50 (25%: MS, its upper edge), class 3 on 52 (26%: ML), background on 76. The prediction
    is right except: every ignored pixel predicted as class 1, two class-2 pixels predicted as background."""
    gt = np.zeros((10, 20), np.int64)
    gt.ravel()[:10], gt.ravel()[10:22], gt.ravel()[22:72], gt.ravel()[72:124] = 1, 2, 1000, 3
    pred = np.where(gt == 1000, 1, gt)
    pred.ravel()[10:12] = 0
    return gt, pred


def test_imagenet_s_official_metric():
    """LUSSeg/ImageNet-S evaluator.py: T counts predictions on ignored pixels, IoU = TP / (T + P - TP), mean
    over all classes (absent ones count 0)."""
    gt, pred = imagenet_s_case()
    conf = benchmarks.confusion(gt, pred, 5, ignore=1000)
    # class 0: TP 76, T 78, P 76; class 1: TP 10, T 10 + 50, P 10; class 2: TP 10, T 10, P 12; class 3: 52/52/52
    m = benchmarks.semantic_metrics(conf, list("abcde"), official_imagenet_s=True)
    assert m["mIoU"] == pytest.approx(100 * (76 / 78 + 10 / 60 + 10 / 12 + 1 + 0) / 5)
    # the running_score rule drops the ignored pixels on both sides and class 4 (absent)
    assert benchmarks.semantic_metrics(conf, list("abcde"))["mIoU"] == pytest.approx(100 * (76 / 78 + 1 + 10 / 12 + 1) / 4)


def test_imagenet_s_size_buckets():
    gt, pred = imagenet_s_case()
    bk = benchmarks.size_buckets(gt, pred, 4, 1000)
    # S: background + class 1, both perfect; MS: background + class 2 + the ignore region (its pixels
    # predicted as class 1 count in T of class 1, which has no GT here and is skipped); ML: background +
    # class 3, perfect; L: empty
    assert bk[0][:4].sum(1).tolist() == [76, 10, 0, 0] and bk[0][4].sum() == 0
    assert bk[1][:4].sum(1).tolist() == [76, 0, 12, 0] and bk[1][4].tolist() == [0, 50, 0, 0]
    assert bk[2][:4].sum(1).tolist() == [76, 0, 0, 52] and bk[3].sum() == 0
    assert [benchmarks.bucket_miou(c) for c in bk] == [pytest.approx(100), pytest.approx(100 * (76 / 78 + 10 / 12) / 2),
                                              pytest.approx(100), None]
    half = np.zeros((10, 10), np.int64)
    half[:5], half[5:] = 1, 2  # 50% each: ML, its upper edge
    assert benchmarks.size_buckets(half, half, 3, 1000)[2][:3].sum(1).tolist() == [0, 50, 50]
    half.ravel()[50] = 1  # 51%: L
    assert benchmarks.size_buckets(half, half, 3, 1000)[3][:3].sum(1).tolist() == [0, 51, 0]


def test_imagenet_s_image_scores():
    """evaluator.py's image-level Acc and F-measure (beta^2 = 0.3, the ignore value counts as foreground)."""
    gt, pred = np.array([[0, 1], [1000, 2]]), np.array([[1, 1], [2, 0]])
    acc, f = benchmarks.image_scores(gt, pred, 3)  # largest predicted class 1 is in the GT; P = R = 2/3
    assert acc == 1.0 and f == pytest.approx(2 / 3)
    assert benchmarks.image_scores(gt, np.array([[0, 0], [2, 2]]), 3)[0] == 1.0
    assert benchmarks.image_scores(np.array([[0, 1]]), np.array([[2, 2]]), 3)[0] == 0.0


def coco_gt_from(masks, labels, h, w):
    return {"images": [{"id": 1, "height": h, "width": w}],
            "annotations": [benchmarks.gt_annotation(m, l, 1, k + 1) for k, (m, l) in enumerate(zip(masks, labels))],
            "categories": [{"id": c, "name": str(c)} for c in range(1, 6)]}


def test_ap_perfect_and_shuffled():
    masks = []
    for k in range(5):
        m = np.zeros((40, 40), bool)
        m[k * 8:k * 8 + 6, k * 7:k * 7 + 9] = True
        masks.append(m)
    labels = [1, 2, 3, 4, 5]
    gt = coco_gt_from(masks, labels, 40, 40)
    dets = [{"image_id": 1, "category_id": l, "segmentation": benchmarks.mask_to_rle(m), "score": 0.9} for m, l in zip(masks, labels)]
    assert benchmarks.coco_segm_ap(gt, dets, [1]) == [pytest.approx(100.0)] * 3
    wrong = [{**d, "category_id": labels[(k + 1) % 5]} for k, d in enumerate(dets)]
    assert benchmarks.coco_segm_ap(gt, wrong, [1])[0] == pytest.approx(0.0)
    assert benchmarks.coco_segm_ap(gt, wrong, [1], use_cats=False) == [pytest.approx(100.0)] * 3  # class-agnostic
    assert benchmarks.coco_segm_ap(gt, [], [1]) == [0.0] * 3


def test_ap_on_unrounded_scores():
    """Near-tied scores reach COCOeval as predicted: rounding them would tie a false positive of image 1 with
    a true positive of image 2, and COCOeval breaks ties by image order."""
    box = lambda y: torch.from_numpy(np.pad(np.ones((4, 4), bool), ((y, 12 - y), (2, 10))))  # noqa: E731
    gt = {"images": [{"id": 1, "height": 16, "width": 16}, {"id": 2, "height": 16, "width": 16}],
          "annotations": [benchmarks.gt_annotation(box(0).numpy(), 1, i, i) for i in (1, 2)], "categories": [{"id": 1, "name": "a"}]}
    pred = lambda masks, scores: {"masks": torch.stack(masks), "labels": torch.ones(len(masks), dtype=torch.long),  # noqa: E731
                                  "scores": torch.tensor(scores, dtype=torch.float64)}
    dets = benchmarks.detections(pred([box(8), box(0)], [0.500001, 0.3]), 1, [0, 1]) + benchmarks.detections(pred([box(0)], [0.500003]), 2, [0, 1])
    assert [d["score"] for d in dets] == [0.500001, 0.3, 0.500003]
    raw = benchmarks.coco_segm_ap(gt, dets, [1, 2])
    rounded = benchmarks.coco_segm_ap(gt, [{**d, "score": round(d["score"], 5)} for d in dets], [1, 2])
    assert raw[1] > rounded[1]  # TP first on the raw scores: precision 1 at recall 0.5


def test_mask_nms_in_the_zutis_path():
    """The zutis path (ZutisSegmenter -> model.instances_from_outputs) drops duplicates with model.mask_nms."""
    import model
    a = torch.zeros(4, 10, 10, dtype=torch.bool)
    a[0, :5] = a[1, :5] = a[2, :5] = True  # 0 and 1 duplicates of class 3; 2 the same mask but class 4
    a[1, 5] = True
    a[3, 6:] = True
    keep = model.mask_nms(a, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([3, 3, 4, 3]), iou=0.3)
    assert sorted(keep.tolist()) == [0, 2, 3]


def test_maskclip_components():
    sem = torch.zeros(6, 8, dtype=torch.long)
    sem[0:2, 0:2] = 1
    sem[4:6, 5:8] = 1  # a second component of class 1
    sem[3, 0] = 2
    prob = {1: np.full((6, 8), 0.7), 2: np.full((6, 8), 0.2)}
    r = evaluate.component_instances(sem, lambda c: prob[c])
    assert r["labels"].tolist() == [1, 1, 2] and r["masks"].sum((1, 2)).tolist() in ([4, 6, 1], [6, 4, 1])
    assert r["scores"].tolist() == pytest.approx([0.7, 0.7, 0.2])


# ----------------------------------------------------------------------------- the pipeline with an oracle

class Oracle:
    """Returns the ground truth of the image it is given (looked up by pixel content), optionally
    with labels permuted: checks the loop, gathering and COCOeval wiring without a model."""
    kind, norm, device = "oracle", "imagenet", torch.device("cpu")

    def __init__(self, bench, perm=None):
        self.categories, self.perm, self.table = list(bench.categories), perm, {}
        for s in bench.samples:
            sem = bench.load_semantic(s)
            img = evaluate.image_tensor(Image.open(s["image"]).convert("RGB"))
            self.table[img.float().sum().item()] = (sem, bench.load_instances(s, sem))

    def set_categories(self, names):
        self.categories = list(names)

    def __call__(self, x, out_size, instances=True):
        sem, inst = next(v for k, v in self.table.items() if abs(k - self.key) < 1e-3)
        f = (lambda l: self.perm[l]) if self.perm else (lambda l: l)
        sem = torch.from_numpy(np.vectorize(lambda v: f(v) if v != 255 else 0)(sem))
        return {"semantic": sem, "masks": torch.from_numpy(np.stack([m for m, _ in inst])),
                "labels": torch.tensor([f(l) for _, l in inst]), "scores": torch.ones(len(inst))}


def test_oracle_gives_100_and_shuffled_low(voc_root, tmp_path, monkeypatch):
    b = benchmarks.read_bench("voc", voc_root)
    orig = evaluate.infer
    monkeypatch.setattr(evaluate, "infer", lambda seg, img, *a, **k: (setattr(seg, "key", img.float().sum().item()), orig(seg, img, *a, **k))[1])
    m = evaluate.evaluate_bench(Oracle(b), b, str(tmp_path / "o"), n_vis=1)
    assert m["mIoU"] == pytest.approx(100) and m["AP"] == pytest.approx(100) and m["AP50_agn"] == pytest.approx(100)
    assert m["n_images"] == 4 and m["n_gt_instances"] == 6
    assert os.listdir(tmp_path / "o" / "vis") and json.load(open(tmp_path / "o" / "metrics.json"))["mIoU"] == pytest.approx(100)
    own = str(tmp_path / "VOC2012")  # a private copy: the module's dataset stays intact
    write_voc(own)
    b2 = benchmarks.read_bench("voc", own)
    oracle = Oracle(b2)
    os.remove(b2.samples[1]["obj"])  # a missing ground-truth file: skipped and listed, the rest scored
    m = evaluate.evaluate_bench(oracle, b2, str(tmp_path / "s"))
    assert m["n_images"] == 3 and m["n_skipped"] == 1 and "2007_000001" in open(tmp_path / "s" / "skipped.txt").read()
    perm = {0: 0, 12: 15, 15: 12}
    m = evaluate.evaluate_bench(Oracle(b, perm), b, None)
    assert m["mIoU"] < 50 and m["AP"] == pytest.approx(0) and m["AP_agn"] == pytest.approx(100)


class Constant:
    """A segmenter predicting one label everywhere and no instances."""
    kind, norm, device = "constant", "imagenet", torch.device("cpu")

    def __init__(self, categories, label):
        self.categories, self.label = list(categories), label

    def set_categories(self, names):
        self.categories = list(names)

    def __call__(self, x, out_size, instances=True):
        assert tuple(x.shape[-2:]) == (1024, 18)  # 1100 x 20: the short side int(20 / 1100 * 1024)
        return {"semantic": torch.full(out_size, self.label, dtype=torch.long), "masks": torch.zeros(0, *out_size, dtype=torch.bool),
                "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}


def test_resize_the_official_way():
    """Longer side above max_size: the uint8 image resized with PIL bilinear (antialiased), the short side
    truncated, then normalised; smaller images pass untouched."""
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 4096, 64), dtype=np.uint8))
    x = evaluate.to_input(img, "imagenet", "cpu", max_size=1024)
    assert x.shape == (1, 3, 1024, 16)
    ref = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((16, 1024), Image.BILINEAR)
    mean, std = (torch.tensor(v)[:, None, None] for v in common.NORMS["imagenet"])
    assert torch.allclose(x[0], (evaluate.image_tensor(ref).float() / 255 - mean) / std)
    assert (x[0] * std + mean).std() < 0.12  # averaged over ~4x4 pixels (noise std 0.29); plain bilinear: 2x2
    assert evaluate.to_input(img[:, :100], "imagenet", "cpu", max_size=1024).shape == (1, 3, 100, 64)


def test_imagenet_s_test_split_writes_server_pngs(tmp_path):
    root = tmp_path / "ImageNetS919"
    save_jpg(f"{root}/test/n01440764/ILSVRC2012_test_00000001.JPEG", 1100, 20)  # longer side capped at 1024
    m = evaluate.run_benchmark(Constant(categories.IMAGENET_S919, 600), "imagenet_s919", str(root), out_dir=str(tmp_path / "o"), split="test")
    png = np.array(Image.open(tmp_path / "o" / "test" / "n01440764" / "ILSVRC2012_test_00000001.png"))
    assert png.shape == (1100, 20, 3) and (png[..., 0] == 600 % 256).all() and (png[..., 1] == 2).all() and m["n_images"] == 1


class Fixed:
    """A segmenter returning a fixed semantic map per output size (each test image has its own size)."""
    kind, norm, device = "fixed", "imagenet", torch.device("cpu")

    def __init__(self, categories, preds):
        self.categories, self.preds = list(categories), preds

    def set_categories(self, names):
        self.categories = list(names)

    def __call__(self, x, out_size, instances=True):
        return {"semantic": torch.from_numpy(self.preds[tuple(out_size)])}


def test_imagenet_s_val_scored_both_ways(tmp_path):
    """metrics.json of imagenet_s919 val: the benchmark's evaluator as the headline, the official trainer's
    running_score rule as mIoU_official_trainer, on imagenet_s_case (predictions on ignored pixels, a
    class-2 miss) where they differ; 916 of the 920 classes absent from both sides."""
    root = tmp_path / "ImageNetS919"
    gt, pred = imagenet_s_case()
    save_jpg(f"{root}/validation/n01440764/ILSVRC2012_val_00000293.JPEG", 10, 20)
    os.makedirs(f"{root}/validation-segmentation/n01440764")
    Image.fromarray(np.stack([gt % 256, gt // 256, 0 * gt], -1).astype(np.uint8)).save(
        f"{root}/validation-segmentation/n01440764/ILSVRC2012_val_00000293.png")
    m = evaluate.run_benchmark(Fixed(categories.IMAGENET_S919, {(10, 20): pred}), "imagenet_s919", str(root), out_dir=str(tmp_path / "o"))
    # evaluator: class 1 has T = 10 + 50 (the ignored pixels predicted as 1), the mean is over all 920 classes
    assert m["mIoU"] == pytest.approx(100 * (76 / 78 + 10 / 60 + 10 / 12 + 1) / 920)
    # official trainer (trainer.py evaluate, RunningScore): ground truth 1000 >= K dropped with its
    # predictions, nanmean over the 4 classes present
    assert m["mIoU_official_trainer"] == pytest.approx(100 * (76 / 78 + 1 + 10 / 12 + 1) / 4)
    assert [m[k] for k in ("S", "MS", "ML", "L")] == [pytest.approx(100), pytest.approx(100 * (76 / 78 + 10 / 12) / 2),
                                                      pytest.approx(100), None]
    recall = 122 / 124  # foreground = non-zero, the ignore value included: 124 true, 122 predicted, all hits
    assert m["Acc"] == pytest.approx(100) and m["FMeasure"] == pytest.approx(100 * 1.3 * recall / (0.3 + recall))
    assert json.load(open(tmp_path / "o" / "metrics.json"))["mIoU_official_trainer"] == pytest.approx(m["mIoU_official_trainer"])


def read_shapes(data_root, split=None, **_):
    """A benchmark without a background class: <root>/images/*.png with <root>/labels/*.png, 1..3 the
    classes, 0 unlabeled and 255 void."""
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(data_root, "images")))
    samples = [{"id": i, "name": n, "image": os.path.join(data_root, "images", n + ".png"),
                "gt": os.path.join(data_root, "labels", n + ".png")} for i, n in enumerate(names)]
    return benchmarks.Bench(samples, load_semantic=lambda s: benchmarks.read_png(s["gt"]))


def test_a_new_benchmark_without_background(tmp_path, monkeypatch, tiny_clip_path, capsys):
    """A benchmark registered here, in the test, evaluated end to end through run_benchmark and main with no
    change to evaluate.py. Hand-computed: ground-truth 0 and 255 are void; a predicted 0 (the model's
    background text) is a miss of the true class; background and the class absent from both sides (star,
    predicted only on void pixels) are not averaged in."""
    monkeypatch.setitem(categories.BUILTIN, "shapes", ["background", "circle", "square", "star"])
    monkeypatch.setitem(benchmarks.BENCHES, "shapes", benchmarks.Benchmark("shapes", read_shapes, "data/shapes", "<root>/{images,labels}/*.png",
                                                         "shapes", ("miou",), background=False))
    gts = {"a": np.array([[1, 1, 2, 2], [0, 1, 2, 255]]), "b": np.array([[2, 2, 2, 2], [2, 2, 1, 1], [0, 0, 0, 0]])}
    preds = {(2, 4): np.array([[1, 0, 2, 2], [3, 1, 1, 2]]), (3, 4): np.array([[2, 2, 2, 0], [2, 2, 1, 1], [1, 0, 0, 0]])}
    for k, (name, gt) in enumerate(gts.items()):
        save_jpg(f"{tmp_path}/shapes/images/{name}.png", *gt.shape, k)
        os.makedirs(f"{tmp_path}/shapes/labels", exist_ok=True)
        Image.fromarray(gt.astype(np.uint8)).save(f"{tmp_path}/shapes/labels/{name}.png")
    m = evaluate.run_benchmark(Fixed(categories.BUILTIN["shapes"], preds), "shapes", str(tmp_path / "shapes"), out_dir=str(tmp_path / "o"))
    # circle: TP 2 + 2, ground truth 3 + 2, predicted 3 + 2 -> 4/6; square: TP 2 + 5, ground truth 3 + 6, predicted 2 + 5 -> 7/9
    assert m["mIoU"] == pytest.approx(100 * (4 / 6 + 7 / 9) / 2) and m["pixel_acc"] == pytest.approx(100 * 11 / 14)
    assert m["per_class_iou"] == {"background": None, "circle": pytest.approx(100 * 4 / 6),
                                  "square": pytest.approx(100 * 7 / 9), "star": None}
    assert m["n_images"] == 2 and not any(k.startswith("AP") for k in m)
    run_main(monkeypatch, "--bench", "shapes", "--data_root", str(tmp_path / "shapes"), "--model", "maskclip",
             "--arch", tiny_clip_path, "--out_dir", str(tmp_path / "cli"), "--save_vis", "1")
    cli = json.load(open(tmp_path / "cli" / "metrics.json"))
    assert cli["bench"] == "shapes" and cli["n_images"] == 2 and cli["per_class_iou"]["background"] is None
    assert f"mIoU {cli['mIoU']:.2f} pixel_acc {cli['pixel_acc']:.2f} (2 images)" in capsys.readouterr().out


class TwoRanks:
    """Rank `rank` of a two-process run without torchrun: rank 1 runs first and leaves its results in `box`,
    which rank 0's gather returns after its own."""
    world = 2

    def __init__(self, rank, box):
        self.rank, self.box, self.is_main = rank, box, rank == 0

    def gather(self, obj):
        return [obj] + self.box if self.is_main else self.box.append(obj)


def test_sharded_evaluation_equals_one_process(voc_root, tmp_path, monkeypatch):
    b, orig, calls = benchmarks.read_bench("voc", voc_root), evaluate.infer, []

    def keyed(seg, img, *a, **k):
        calls.append(1)
        seg.key = img.float().sum().item()
        return orig(seg, img, *a, **k)
    monkeypatch.setattr(evaluate, "infer", keyed)
    perm, box = {0: 0, 12: 15, 15: 12}, []
    assert evaluate.evaluate_bench(Oracle(b, perm), b, str(tmp_path / "o"), dist=TwoRanks(1, box)) == {} and len(calls) == 2
    m = evaluate.evaluate_bench(Oracle(b, perm), b, str(tmp_path / "o"), dist=TwoRanks(0, box))
    ref = evaluate.evaluate_bench(Oracle(b, perm), b, None)
    assert len(calls) == 8 and m["n_images"] == 4
    assert all(m[k] == ref[k] for k in ("mIoU", "pixel_acc", "per_class_iou", "AP", "AP_agn", "n_gt_instances", "n_detections"))


# ----------------------------------------------------------------------------- end to end with tiny models

@pytest.fixture(scope="module")
def tiny_ckpt(tiny_clip_path, tmp_path_factory):
    """A train.py-format checkpoint of a tiny random ZUTIS on the conftest tiny CLIP."""
    import model
    net = model.ZUTIS(tiny_clip_path, ["background", "person", "dog"], n_queries=8, n_layers=1, n_heads=2, dim_ffn=32, mlp_hidden=16)
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    torch.save({"model": net.state_dict(), "step": 0,
                "config": {**net.hparams, "arch": tiny_clip_path, "categories": net.categories, "norm": "imagenet",
                                                            "ignore_index": 255}}, path)
    return path


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device", "cpu", *argv])
    evaluate.main()


def test_cli_zutis_voc(voc_root, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "z"
    run_main(monkeypatch, "--bench", "voc", "--data_root", os.path.dirname(os.path.dirname(voc_root)), "--ckpt", tiny_ckpt,
             "--out_dir", str(out), "--save_vis", "2", "--split", "val")
    m = json.load(open(out / "metrics.json"))
    assert m["n_images"] == 2 and m["n_gt_instances"] == 3 and 0 <= m["mIoU"] <= 100
    assert {"AP", "AP50", "AP75", "AP_agn", "pixel_acc", "config", "git_sha"} <= set(m) and m["config"]["nms"] == "hard"
    assert isinstance(json.load(open(out / "instances.json")), list) and len(os.listdir(out / "vis")) == 2


def test_cli_maskclip_voc_and_run_benchmark(voc_root, tiny_clip_path, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m"
    run_main(monkeypatch, "--bench", "voc", "--data_root", voc_root, "--model", "maskclip", "--arch", tiny_clip_path,
             "--classes", "person,dog", "--out_dir", str(out), "--save_vis", "1")
    m = json.load(open(out / "metrics.json"))
    assert m["n_images"] == 4 and "AP50_agn" in m and list(m["per_class_iou"]) == ["background", "person", "dog"]
    # train.py's path: a raw ZUTIS module, evaluated with its own categories
    import model
    net = model.load_checkpoint(tiny_ckpt)
    r = evaluate.run_benchmark(net, "voc", voc_root, max_images=2, save_vis=0)
    assert r["n_images"] == 2 and net.categories == ["background", "person", "dog"] and "mIoU" in r


def test_cub_breed_mode_with_maskclip(tmp_path, tiny_clip):
    test_cub_reader(tmp_path)
    seg = evaluate.MaskCLIPSegmenter(tiny_clip, ["background", "bird"])
    m = evaluate.run_benchmark(seg, "cub", str(tmp_path), cub_text="breed")
    assert m["n_images"] == 2 and 0 <= m["fg_iou"] <= 100 and m["fg_iou_per_image"] is not None
    assert ("background", "Laysan Albatross") in seg._cache  # each image was segmented with its breed name


def test_images_demo(tiny_ckpt, tmp_path, monkeypatch, capsys):
    src = tmp_path / "photos"
    save_jpg(f"{src}/a.jpg", 40, 56, 1)
    save_jpg(f"{src}/more/b.png", 33, 17, 2)  # odd size, smaller than a legend
    save_jpg(f"{src}/tiny.png", 5, 40, 3)  # smaller than one patch
    (src / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "demo"
    run_main(monkeypatch, "--images", str(src), "--classes", "cat,dog,red bicycle", "--ckpt", tiny_ckpt, "--out_dir", str(out))
    for stem in ("a", "more/b"):
        for kind in ("semantic", "instances", "labels"):
            assert (out / f"{stem}_{kind}.png").is_file()
    lab = np.array(Image.open(out / "more" / "b_labels.png"))
    assert lab.shape == (33, 17) and lab.max() <= 3
    coco = json.load(open(out / "predictions.json"))
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "red bicycle"] and len(coco["images"]) == 2
    assert all(1 <= a["category_id"] <= 3 and "counts" in a["segmentation"] for a in coco["annotations"])
    printed, listed = capsys.readouterr().out, open(out / "skipped.txt").read()
    for name, why in (("broken.jpg", "UnidentifiedImageError"), ("tiny.png", "smaller than one 8-pixel patch")):
        assert f"skipped {name}: " in printed and name in listed and why in listed
    run_main(monkeypatch, "--images", str(src / "a.jpg"), "--classes", "bird", "--ckpt", tiny_ckpt, "--out_dir", str(out / "one"))
    assert [c["name"] for c in json.load(open(out / "one" / "predictions.json"))["categories"]] == ["bird"]


def test_bench_infer_cpu(tiny_clip_path, tmp_path):
    r = bench.main(["infer", "--device", "cpu", "--archs", tiny_clip_path, "--sizes", "32x48,40x24", "--images", "2",
                    "--warmup", "1", "--classes", "cat,dog", "--settings", "float32,bfloat16", "--json", str(tmp_path / "b.json")])
    rows = json.load(open(tmp_path / "b.json"))["results"]["rows"]
    assert r is None and rows[0]["img_per_s"] > 0 and rows[0]["images"] == 2 and rows[0]["classes"] == 3
    assert [x["setting"] for x in rows] == ["float32", "bfloat16"] and rows[0]["sem_equal_%"] == 100
    assert rows[1]["sem_equal_%"] > 50 and rows[1]["img_per_s"] > 0  # loose: the real figures are bench.py's


# ----------------------------------------------------------------------------- checkpoints that travel

def test_checkpoint_from_another_directory_and_arch_override(voc_root, tiny_clip_path, tiny_ckpt, tmp_path, monkeypatch):
    """The stored CLIP path works from any working directory, and --arch overrides a stored path that moved."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_main(monkeypatch, "--bench", "voc", "--data_root", voc_root, "--ckpt", tiny_ckpt, "--max_images", "1", "--save_vis", "0")
    assert json.load(open(elsewhere / "out" / "eval_voc_zutis" / "metrics.json"))["n_images"] == 1
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["config"]["arch"] = "moved/tiny_clip.pt"
    torch.save(ck, elsewhere / "moved.pt")
    run_main(monkeypatch, "--bench", "voc", "--data_root", voc_root, "--ckpt", "moved.pt", "--arch", tiny_clip_path,
             "--max_images", "1", "--save_vis", "0", "--out_dir", "o2")
    assert json.load(open(elsewhere / "o2" / "metrics.json"))["n_images"] == 1


# ----------------------------------------------------------------------------- external proposals

class PerfectNet(torch.nn.Module):
    """A stand-in ZUTIS whose tokens are the one-hot true class at every pixel (a perfect semantic map) and
    whose decoder proposes nothing; the image is recognised by the sum of its normalised pixels."""

    def __init__(self, bench):
        super().__init__()
        self.w, self.patch_size, self.categories, self.table = torch.nn.Parameter(torch.zeros(1)), 1, list(bench.categories), {}
        for s in bench.samples:
            x = evaluate.to_input(evaluate.image_tensor(Image.open(s["image"]).convert("RGB")), "imagenet", "cpu")
            sem = torch.from_numpy(bench.load_semantic(s))
            self.table[x.sum().item()] = torch.where(sem == 255, 0, sem)

    def forward(self, x):
        sem = next(v for k, v in self.table.items() if abs(k - x.sum().item()) < 1e-2)
        K = len(self.categories)
        return {"patch_tokens": torch.eye(K)[sem][None], "text_emb": torch.eye(K), "logit_scale": 1.0,
                "mask_logits": torch.full((1, 1, 1, *sem.shape), -10.0)}


def write_proposals(path, bench, key="file_name", size=None, extra=()):
    """The ground-truth instances of `bench` as a COCO results file (score 0.9), matched by `key`."""
    out = []
    for s in bench.samples:
        for m, _ in bench.load_instances(s, bench.load_semantic(s)):
            rle = benchmarks.mask_to_rle(m)
            rle["size"] = size or rle["size"]
            ident = {"file_name": f"JPEGImages/{s['name']}.jpg"} if key == "file_name" else {"image_id": s["id"]}
            out.append({**ident, "segmentation": rle, "score": 0.9, "category_id": 1})
    with open(path, "w") as f:
        json.dump(out + list(extra), f)
    return out


def test_proposals_round_trip_through_pycocotools(voc_root, tmp_path):
    from pycocotools.coco import COCO
    b = benchmarks.read_bench("voc", voc_root)
    written = write_proposals(tmp_path / "p.json", b, extra=[{"image_id": 99, "segmentation": written_rle(), "score": 1}])
    props, unmatched = evaluate.read_proposals(str(tmp_path / "p.json"), b.samples)
    assert unmatched == 1 and sum(map(len, props.values())) == len(written) == 6
    s = b.samples[0]
    masks, scores = evaluate.decode_proposals(props[s["id"]], (32, 48))
    assert [m.numpy().tolist() for m in masks] == [m.tolist() for m, _ in b.load_instances(s, b.load_semantic(s))]
    assert scores.tolist() == pytest.approx([0.9, 0.9])
    gt = {"images": [{"id": s["id"], "height": 32, "width": 48} for s in b.samples], "annotations": [], "categories": [{"id": 1}]}
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    res = coco.loadRes([{**d, "image_id": s["id"]} for d, s in zip(written, b.samples)])  # valid COCO results
    assert len(res.anns) == len(b.samples)


def written_rle():
    return benchmarks.mask_to_rle(np.ones((32, 48), bool))


def test_gt_proposals_named_by_a_perfect_semantic_map(voc_root, tmp_path):
    """Ground-truth instances as proposals, named from a perfect semantic map: every instance gets its class
    (class-aware AP 100), background is dropped, and the score is the proposal's times sigmoid(5)."""
    b = benchmarks.read_bench("voc", voc_root)
    write_proposals(tmp_path / "p.json", b, key="image_id")
    seg = evaluate.ZutisSegmenter(PerfectNet(b))
    m = evaluate.evaluate_bench(seg, b, str(tmp_path / "o"), proposals=str(tmp_path / "p.json"), n_vis=0)
    assert m["AP"] == pytest.approx(100) and m["n_detections"] == m["n_gt_instances"] == 6
    assert m["proposals"] == {"file": str(tmp_path / "p.json"), "matched": 6, "unmatched": 0}
    scores = [d["score"] for d in json.load(open(tmp_path / "o" / "instances.json"))]
    assert scores == pytest.approx([0.9 * torch.sigmoid(torch.tensor(5.0)).item()] * 6)
    s = b.samples[0]
    bg = torch.zeros(1, 32, 48, dtype=torch.bool)
    bg[0, 0, :3] = True  # a background proposal is dropped
    p = seg(evaluate.to_input(evaluate.image_tensor(Image.open(s["image"])), "imagenet", "cpu"), (32, 48), proposals=(bg, torch.ones(1)))
    assert len(p["labels"]) == 0


def test_proposals_with_maskclip(voc_root, tiny_clip, tmp_path):
    b = benchmarks.read_bench("voc", voc_root)
    write_proposals(tmp_path / "p.json", b)
    seg = evaluate.MaskCLIPSegmenter(tiny_clip, b.categories, with_decoder=True)
    m = evaluate.evaluate_bench(seg, b, None, proposals=str(tmp_path / "p.json"))
    assert m["proposals"]["matched"] == 6 and "AP" in m


def test_proposals_on_your_images(tiny_ckpt, tmp_path, monkeypatch, capsys):
    save_jpg(f"{tmp_path}/photos/a.jpg", 40, 56, 1)
    m = np.zeros((40, 56), bool)
    m[5:30, 10:40] = True
    props = [{"file_name": "photos/a.jpg", "segmentation": benchmarks.mask_to_rle(m), "score": 0.8},
             {"file_name": "elsewhere/zzz.jpg", "segmentation": benchmarks.mask_to_rle(m), "score": 0.8}]
    (tmp_path / "p.json").write_text(json.dumps(props))
    run_main(monkeypatch, "--images", str(tmp_path / "photos"), "--classes", "cat,dog", "--ckpt", tiny_ckpt, "--proposals",
             str(tmp_path / "p.json"), "--proposal_score", "proposal", "--out_dir", str(tmp_path / "d"))
    assert "proposals: 1 matched, 1 unmatched" in capsys.readouterr().out
    anns = json.load(open(tmp_path / "d" / "predictions.json"))["annotations"]
    assert len(anns) <= 1 and all(a["category_name"] in ("cat", "dog") and a["score"] == pytest.approx(0.8) for a in anns)


def test_proposal_errors(voc_root, tiny_ckpt, tmp_path, monkeypatch, capsys):
    b = benchmarks.read_bench("voc", voc_root)
    args = ("--bench", "voc", "--data_root", voc_root, "--ckpt", tiny_ckpt, "--save_vis", "0", "--out_dir", str(tmp_path / "o"))
    (tmp_path / "bad.json").write_text(json.dumps({"not": "results"}))
    assert "is not a COCO results list of RLE masks" in cli_error(monkeypatch, capsys, *args, "--proposals", str(tmp_path / "bad.json"))
    (tmp_path / "none.json").write_text(json.dumps([{"image_id": 12345, "segmentation": written_rle(), "score": 1}]))
    assert "none of the 1 proposals" in cli_error(monkeypatch, capsys, *args, "--proposals", str(tmp_path / "none.json"))
    write_proposals(tmp_path / "size.json", b, size=[10, 10])
    assert "is 10x10, the image 32x48" in cli_error(monkeypatch, capsys, *args, "--proposals", str(tmp_path / "size.json"))


# ----------------------------------------------------------------------------- one-line errors

def cli_error(monkeypatch, capsys, *argv):
    """evaluate.py's main as the command line runs it: exit 2, exactly one `error:` line, no traceback."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device", "cpu", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_main(evaluate.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_errors(voc_root, tiny_ckpt, tmp_path, monkeypatch, capsys):
    assert "unknown benchmark 'kitti'" in cli_error(monkeypatch, capsys, "--bench", "kitti")
    assert "data root not found" in cli_error(monkeypatch, capsys, "--bench", "voc", "--data_root", str(tmp_path / "missing"))
    assert "not found" in cli_error(monkeypatch, capsys, "--bench", "voc", "--data_root", voc_root, "--ckpt", str(tmp_path / "no.pt"))
    assert "--nms must be one of" in cli_error(monkeypatch, capsys, "--nms", "soft")
    fake = tmp_path / "photos"
    fake.mkdir()
    (fake / "x.jpg").write_bytes(b"not an image")
    assert "none of the 1 images could be segmented" in cli_error(monkeypatch, capsys, "--images", str(fake), "--classes", "bird",
                                                                  "--ckpt", tiny_ckpt, "--out_dir", str(tmp_path / "d"))


def test_random_bytes_checkpoint_subprocess(voc_root, tmp_path):
    """A random-bytes --ckpt from the real command line: exit 2, one `error:` line, no traceback."""
    (tmp_path / "junk.pt").write_bytes(os.urandom(4096))
    r = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--device", "cpu", "--bench", "voc", "--data_root",
                        voc_root, "--ckpt", str(tmp_path / "junk.pt"), "--out_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert "junk.pt" in err[0]


def test_official_layout_file_on_voc(voc_root, tiny_ckpt, tiny_clip_path, tmp_path, monkeypatch):
    """issue 8: `evaluate.py --bench voc --ckpt official-layout-file.pt` end to end (--arch names the
    CLIP of a file that is not one of the released ViT-B files)."""
    import model
    path = str(tmp_path / "official_layout.pt")
    torch.save(model.to_official(model.load_checkpoint(tiny_ckpt)), path)
    run_main(monkeypatch, "--bench", "voc", "--data_root", voc_root, "--ckpt", path, "--arch", tiny_clip_path,
             "--out_dir", str(tmp_path / "o"), "--save_vis", "0", "--max_images", "2", "--nms", "none")
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert m["n_images"] == 2 and len(m["per_class_iou"]) == 21 and m["config"]["nms"] == "none"


def test_interrupted_evaluation_resumes(voc_root, tmp_path, monkeypatch):
    b = benchmarks.read_bench("voc", voc_root)
    orig, calls = evaluate.infer, []

    def counting(seg, img, *a, **k):
        calls.append(1)
        if getattr(seg, "stop_at", None) == len(calls):
            raise KeyboardInterrupt
        seg.key = img.float().sum().item()
        return orig(seg, img, *a, **k)
    monkeypatch.setattr(evaluate, "infer", counting)
    out = str(tmp_path / "r")
    oracle = Oracle(b, {0: 0, 12: 15, 15: 12})
    oracle.stop_at = 4
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_bench(oracle, b, out, save_every=1)
    assert os.path.isfile(os.path.join(out, ".partial_rank0of1.pt"))
    oracle.stop_at, calls[:] = None, []
    m = evaluate.evaluate_bench(oracle, b, out, save_every=1)
    assert len(calls) == 1 and m["n_images"] == 4 and not os.path.exists(os.path.join(out, ".partial_rank0of1.pt"))
    ref = evaluate.evaluate_bench(Oracle(b, {0: 0, 12: 15, 15: 12}), b, None)
    assert all(m[k] == ref[k] for k in ("mIoU", "pixel_acc", "AP", "AP_agn", "n_gt_instances", "n_detections"))


def test_legend_layout():
    """with_legend appends 12 px per row of entries below the image, filled row by row into `cols`
    columns; a swatch has its colour, a None colour draws text only."""
    img = np.zeros((10, 100, 3), np.uint8)
    one = visualize.with_legend(img, [((255, 0, 0), "a"), ((0, 255, 0), "b"), ((0, 0, 255), "c")])
    assert one.shape == (10 + 12 * 3 + 4, 100, 3) and (one[:10] == 0).all()
    assert tuple(one[10 + 2 + 12 * 2 + 4, 6]) == (0, 0, 255)  # third swatch, third line
    two = visualize.with_legend(img, [((255, 0, 0), "a"), ((0, 255, 0), "b"), (None, "note")], cols=2)
    assert two.shape == (10 + 12 * 2 + 4, 100, 3)
    assert tuple(two[10 + 6, 50 + 6]) == (0, 255, 0)  # second entry: first row, second column
    assert two[10 + 2 + 12:10 + 12 + 12, 2:12].mean() > 150  # text-only entry: mostly white, no swatch
