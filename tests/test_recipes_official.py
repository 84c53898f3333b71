"""The ImageNet recipes hold their papers' official values: each key below is pinned with its source.

Every recipe in ``configs/imagenet/`` is resolved through the real loader (``load_config``: its
``defaults`` base, the method's config class, the view presets) and compared with this table, so
changing a recipe value, a base value, a preset or a dataclass default that a recipe relies on
fails here, naming the key and where the official value comes from. A value that deliberately
differs from the official code is pinned too, and its source says so ("not ...'s").

Sources: files of the official repositories (line numbers at their current default branch,
SimCLR's at tag 1.0 where said), or the paper where no code was released.
"""
import math
from pathlib import Path

import pytest

from fastssl.config import derive, load_config

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT / "configs" / "imagenet"
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's train split: derived values (peak lr) use it

SIMCLR = "google-research/simclr"
SIMCLR_JITTER = "simclr data_util.py:61-64, run.py:222 color_jitter_strength=1.0 (tag 1.0)"
BYOL = "google-deepmind/deepmind-research byol/configs/byol.py"
SWAV = "facebookresearch/swav scripts/swav_200ep_bs256_pretrain.sh"
SWAV_AUG = "facebookresearch/swav src/multicropdataset.py:37,71,90-92"
SIMSIAM = "facebookresearch/simsiam main_simsiam.py"
VICREG = "facebookresearch/vicreg"
BARLOW = "facebookresearch/barlowtwins main.py"
DINO = "facebookresearch/dino main_dino.py"
DINO_B = "DINO's released dino_vitbase16_pretrain/args.txt"
MOCO = "facebookresearch/moco-v3 CONFIG.md:110-113"
MAE = "facebookresearch/mae PRETRAIN.md"

# recipe -> {key: (official value, source)}. Keys are config paths; ``aug.views.N.field`` is the
# resolved view N; ``derived.lr`` is the peak learning rate :func:`derive` computes.
OFFICIAL: dict[str, dict[str, tuple[object, str]]] = {
    "simclr_rn50": {
        "method.temperature": (0.1, f"{SIMCLR} run.py:186 (tag 1.0)"),
        "method.proj_dim": (128, f"{SIMCLR} run.py:198 head_proj_dim (tag 1.0)"),
        "optim.name": ("lars", f"{SIMCLR} run.py:166 (tag 1.0)"),
        "optim.batch_size": (512, f"{SIMCLR} run.py:58 train_batch_size (tag 1.0)"),
        "derived.lr": (0.075 * math.sqrt(512), "SimCLR appendix B.1, simclr model_util.py:66-67: 0.075 x sqrt(batch)"),
        "optim.warmup_epochs": (10.0, f"{SIMCLR} run.py:46 (tag 1.0)"),
        "optim.weight_decay": (1e-6, f"{SIMCLR} run.py:50 (tag 1.0)"),
        "optim.lars_eta": (0.001, f"{SIMCLR} lars_optimizer.py:26 EETA_DEFAULT"),
        "optim.min_lr_ratio": (0.0, f"{SIMCLR} model_util.py cosine_decay to 0"),
        "train.epochs": (100, f"{SIMCLR} run.py:66 (tag 1.0)"),
        "aug.views.0.brightness": (0.8, SIMCLR_JITTER),
        "aug.views.1.contrast": (0.8, SIMCLR_JITTER),
        "aug.views.0.saturation": (0.8, SIMCLR_JITTER),
        "aug.views.1.hue": (0.2, SIMCLR_JITTER),
        "aug.views.0.jitter_p": (0.8, f"{SIMCLR} data_util.py:361 (tag 1.0)"),
        "aug.views.0.gray_p": (0.2, f"{SIMCLR} data_util.py:362 (tag 1.0)"),
        "aug.views.0.scale_min": (0.08, f"{SIMCLR} data_util.py:292 area_range (tag 1.0)"),
        "aug.views.1.blur_p": (0.5, f"{SIMCLR} data_util.py:386 blur_probability=0.5 (tag 1.0)"),
    },
    "dcl_rn50": {
        "method.temperature": (0.1, "DCL paper's ImageNet value; SimCLR run.py:186"),
        "method.decoupled": (True, "DCL: the positive out of the denominator"),
        "optim.batch_size": (256, "DCL: works at batch 256"),
        "derived.lr": (0.3, f"{SIMCLR} run.py:42, 0.3 x 256/256"),
        "optim.weight_decay": (1e-6, f"{SIMCLR} run.py:50 (tag 1.0)"),
        "aug.views.0.brightness": (0.8, SIMCLR_JITTER),
        "aug.views.1.saturation": (0.8, SIMCLR_JITTER),
        "aug.views.1.hue": (0.2, SIMCLR_JITTER),
    },
    "byol_rn50": {
        "train.epochs": (300, "the 300-epoch presets below"),
        "optim.lr": (0.3, f"{BYOL}:21 _LR_PRESETS[300]"),
        "optim.weight_decay": (1e-6, f"{BYOL}:22 _WD_PRESETS[300]"),
        "method.momentum": (0.99, f"{BYOL}:23 _EMA_PRESETS[300]"),
        "method.momentum_end": (1.0, "BYOL section 3.3: tau increased to 1"),
        "optim.lars_eta": (0.001, f"{BYOL} optimizer_config eta=1e-3"),
        "optim.warmup_epochs": (10.0, f"{BYOL} warmup_steps = 10 epochs"),
        "method.proj_hidden": (4096, f"{BYOL} projector_hidden_size"),
        "method.proj_dim": (256, f"{BYOL} projector_output_size"),
        "method.pred_hidden": (4096, f"{BYOL} predictor_hidden_size"),
        "aug.views.0.blur_p": (1.0, "deepmind-research byol/utils/augmentations.py"),
        "aug.views.1.blur_p": (0.1, "deepmind-research byol/utils/augmentations.py"),
        "aug.views.1.solarize_p": (0.2, "deepmind-research byol/utils/augmentations.py"),
        "aug.views.0.saturation": (0.2, "deepmind-research byol/utils/augmentations.py"),
    },
    "swav_rn50": {
        "optim.lr": (0.6, f"{SWAV}:42 --base_lr 0.6"),
        "optim.batch_size": (256, f"{SWAV}:10,41 4 GPUs x 64"),
        "optim.min_lr_ratio": (0.001, f"{SWAV}:43 --final_lr 0.0006"),
        "optim.warmup_epochs": (0.0, f"{SWAV}:46 --warmup_epochs 0"),
        "optim.weight_decay": (1e-6, f"{SWAV}:45 --wd 0.000001"),
        "optim.lars_eta": (0.001, "facebookresearch/swav main_swav.py:177 trust_coefficient=0.001"),
        "train.epochs": (200, f"{SWAV}:40"),
        "method.temperature": (0.1, f"{SWAV}:33"),
        "method.sinkhorn_eps": (0.05, f"{SWAV}:34"),
        "method.sinkhorn_iters": (3, f"{SWAV}:35"),
        "method.proj_dim": (128, f"{SWAV}:36 --feat_dim"),
        "method.num_prototypes": (3000, f"{SWAV}:37"),
        "method.queue_size": (3840, f"{SWAV}:38"),
        "method.queue_start_epochs": (15.0, f"{SWAV}:39"),
        "method.freeze_prototypes_epochs": (1.0, f"{SWAV}:44 5005 iterations = 1 epoch at 256"),
        "aug.num_views": (8, f"{SWAV}:28 --nmb_crops 2 6"),
        "aug.views.0.scale_min": (0.14, f"{SWAV}:30 --min_scale_crops 0.14 0.05"),
        "aug.views.1.scale_max": (1.0, f"{SWAV}:31 --max_scale_crops 1. 0.14"),
        "aug.views.2.scale_min": (0.05, f"{SWAV}:30"),
        "aug.views.7.scale_max": (0.14, f"{SWAV}:31"),
        "aug.views.2.size": (96, f"{SWAV}:29 --size_crops 224 96"),
        "aug.views.0.brightness": (0.8, SWAV_AUG), "aug.views.1.saturation": (0.8, SWAV_AUG),
        "aug.views.7.contrast": (0.8, SWAV_AUG), "aug.views.7.hue": (0.2, SWAV_AUG),
        "aug.views.0.blur_p": (0.5, SWAV_AUG), "aug.views.1.blur_p": (0.5, SWAV_AUG),
        "aug.views.7.blur_p": (0.5, SWAV_AUG),
        "aug.views.0.solarize_p": (0.0, SWAV_AUG), "aug.views.1.solarize_p": (0.0, SWAV_AUG),
    },
    "simsiam_rn50": {
        "optim.name": ("sgd", f"{SIMSIAM}:199"),
        "optim.momentum": (0.9, f"{SIMSIAM}:58"),
        "optim.batch_size": (512, f"{SIMSIAM}:51"),
        "optim.lr": (0.05, f"{SIMSIAM}:56, x batch/256 (:157)"),
        "optim.weight_decay": (1e-4, f"{SIMSIAM}:60"),
        "optim.warmup_epochs": (0.0, f"{SIMSIAM}:359-364 adjust_learning_rate: no warm-up"),
        "train.epochs": (100, f"{SIMSIAM}:47"),
        "method.proj_dim": (2048, f"{SIMSIAM}:86 --dim"),
        "method.pred_hidden": (512, f"{SIMSIAM}:88 --pred-dim"),
        "aug.views.0.scale_min": (0.2, f"{SIMSIAM}:230"),
        "aug.views.1.scale_min": (0.2, f"{SIMSIAM}:230"),
        "aug.views.0.brightness": (0.4, f"{SIMSIAM}:232"),
        "aug.views.0.saturation": (0.4, f"{SIMSIAM}:232"),
        "aug.views.1.saturation": (0.4, f"{SIMSIAM}:232"),
        "aug.views.1.hue": (0.1, f"{SIMSIAM}:232"),
        "aug.views.0.gray_p": (0.2, f"{SIMSIAM}:234"),
        "aug.views.1.blur_p": (0.5, f"{SIMSIAM}:235"),
        "aug.views.0.solarize_p": (0.0, f"{SIMSIAM}:228-238: no solarisation"),
    },
    "vicreg_rn50": {
        "train.epochs": (100, f"{VICREG} README.md:72"),
        "optim.lr": (0.3, f"{VICREG} README.md:72 --base-lr 0.3 for 100 epochs"),
        "optim.min_lr_ratio": (0.001, f"{VICREG} main_vicreg.py:177"),
        "optim.warmup_epochs": (10.0, f"{VICREG} main_vicreg.py:169"),
        "optim.weight_decay": (1e-6, f"{VICREG} main_vicreg.py:54"),
        "optim.lars_eta": (0.001, f"{VICREG} main_vicreg.py:252"),
        "method.proj_dim": (8192, f"{VICREG} main_vicreg.py:44"),
        "method.sim_coeff": (25.0, f"{VICREG} main_vicreg.py:58"),
        "method.std_coeff": (25.0, f"{VICREG} main_vicreg.py:60"),
        "method.cov_coeff": (1.0, f"{VICREG} main_vicreg.py:62"),
        "aug.views.0.blur_p": (1.0, f"{VICREG} augmentations.py:54"),
        "aug.views.1.solarize_p": (0.2, f"{VICREG} augmentations.py:78"),
    },
    "barlow_twins_rn50": {
        "optim.lr": (0.2, f"{BARLOW}:33 --learning-rate-weights"),
        "optim.min_lr_ratio": (0.001, f"{BARLOW}:165"),
        "optim.warmup_epochs": (10.0, f"{BARLOW}:157"),
        "optim.weight_decay": (1.5e-6, "Barlow Twins paper section 4 (main.py:37 defaults to 1e-6)"),
        "optim.lars_eta": (0.001, f"{BARLOW}:225"),
        "method.lambd": (0.0051, f"{BARLOW}:39"),
        "method.proj_dim": (8192, f"{BARLOW}:41"),
        "aug.views.0.blur_p": (1.0, f"{BARLOW}:301"),
        "aug.views.1.solarize_p": (0.2, f"{BARLOW}:317"),
    },
    "nnclr_rn50": {
        "optim.lr": (0.15, "NNCLR paper, implementation details"),
        "optim.weight_decay": (1e-6, "NNCLR paper"),
        "method.temperature": (0.1, "NNCLR paper"),
        "method.queue_size": (98304, "NNCLR paper"),
        "method.proj_dim": (256, "NNCLR paper"),
        "method.pred_hidden": (4096, "NNCLR paper"),
    },
    "mocov3_vits16": {
        "optim.name": ("adamw", f"{MOCO} --optimizer=adamw"),
        "optim.batch_size": (1024, f"{MOCO} -b 1024"),
        "optim.lr": (1.5e-4, f"{MOCO} --lr=1.5e-4"),
        "optim.weight_decay": (0.1, f"{MOCO} --weight-decay=.1"),
        "optim.warmup_epochs": (40.0, f"{MOCO} --warmup-epochs=40"),
        "train.epochs": (300, f"{MOCO} --epochs=300"),
        "method.temperature": (0.2, f"{MOCO} --moco-t=.2"),
        "method.momentum": (0.99, "facebookresearch/moco-v3 main_moco.py:99"),
        "model.frozen_patch_embed": (True, f"{MOCO} --stop-grad-conv1"),
        "method.proj_dim": (256, "facebookresearch/moco-v3 main_moco.py:95"),
        "method.proj_hidden": (4096, "facebookresearch/moco-v3 main_moco.py:97"),
        "aug.views.0.scale_min": (0.08, "facebookresearch/moco-v3 main_moco.py:117 --crop-min"),
        "aug.views.1.solarize_p": (0.2, "facebookresearch/moco-v3 main_moco.py:281"),
    },
    "mae_vitb16": {
        "optim.lr": (1.5e-4, f"{MAE}:15 --blr"),
        "optim.weight_decay": (0.05, f"{MAE}:15"),
        "optim.warmup_epochs": (40.0, f"{MAE}:14"),
        "optim.beta2": (0.95, "facebookresearch/mae main_pretrain.py:180"),
        "train.epochs": (800, f"{MAE}:13"),
        "method.mask_ratio": (0.75, f"{MAE}:12"),
        "method.norm_pix_loss": (True, f"{MAE}:11"),
        "method.decoder_dim": (512, "facebookresearch/mae models_mae.py:226"),
        "method.decoder_depth": (8, "facebookresearch/mae models_mae.py:226"),
        "aug.views.0.scale_min": (0.2, "facebookresearch/mae main_pretrain.py:124"),
        "aug.views.0.jitter_p": (0.0, "facebookresearch/mae main_pretrain.py:123-127: crop and flip only"),
    },
    "mae_vits16": {
        "optim.lr": (1.5e-4, f"{MAE}:15 --blr"),
        "optim.weight_decay": (0.05, f"{MAE}:15"),
        "method.mask_ratio": (0.75, f"{MAE}:12"),
        "method.decoder_dim": (192, "not MAE's 512: scaled to ViT-S (see the recipe)"),
        "aug.views.0.scale_min": (0.2, "facebookresearch/mae main_pretrain.py:124"),
    },
    "dino_vits16": {
        "optim.lr": (5e-4, f"{DINO}:96"),
        "derived.min_lr": (1e-6, f"{DINO}:101 --min_lr"),
        "optim.warmup_epochs": (10.0, f"{DINO}:99"),
        "optim.weight_decay": (0.04, f"{DINO}:82"),
        "optim.weight_decay_end": (0.4, f"{DINO}:84"),
        "optim.clip_grad": (3.0, f"{DINO}:87"),
        "optim.clip_mode": ("per_param", "facebookresearch/dino utils.py:132-141 clip_gradients"),
        "train.epochs": (100, f"{DINO}:92"),
        "model.drop_path": (0.1, f"{DINO}:105"),
        "method.out_dim": (65536, f"{DINO}:55"),
        "method.momentum": (0.996, f"{DINO}:61"),
        "method.teacher_temp": (0.04, f"{DINO}:68"),
        "method.teacher_temp_end": (0.07, "facebookresearch/dino README.md:188 (main_dino.py:71 keeps 0.04)"),
        "method.warmup_teacher_temp_epochs": (30.0, "facebookresearch/dino README.md:188"),
        "method.student_temp": (0.1, f"{DINO}:365"),
        "method.center_momentum": (0.9, f"{DINO}:366"),
        "method.freeze_last_layer_epochs": (1.0, f"{DINO}:93"),
        "aug.num_views": (12, "2 global + 10 local: released args.txt (main_dino.py:112 defaults to 8)"),
        "aug.views.0.scale_min": (0.4, f"{DINO}:108"),
        "aug.views.2.scale_max": (0.4, f"{DINO}:115"),
        "aug.views.0.blur_p": (1.0, f"{DINO}:438"),
        "aug.views.1.solarize_p": (0.2, f"{DINO}:446"),
        "aug.views.2.blur_p": (0.5, f"{DINO}:454"),
    },
    "dino_vitl16": {
        "optim.lr": (7.5e-4, f"{DINO_B} lr 0.00075"),
        "derived.min_lr": (2e-6, f"{DINO_B} min_lr 2e-06"),
        "optim.clip_grad": (0.3, f"{DINO_B} clip_grad 0.3"),
        "optim.clip_mode": ("per_param", "facebookresearch/dino utils.py:132-141 clip_gradients"),
        "method.warmup_teacher_temp_epochs": (50.0, DINO_B),
        "method.teacher_temp_end": (0.07, DINO_B),
        "method.freeze_last_layer_epochs": (3.0, DINO_B),
        "aug.views.0.scale_min": (0.25, f"{DINO_B} global_crops_scale (0.25, 1)"),
        "aug.views.2.scale_max": (0.25, f"{DINO_B} local_crops_scale (0.05, 0.25)"),
        "aug.num_views": (12, f"{DINO_B} local_crops_number 10"),
        "model.drop_path": (0.4, "facebookresearch/dinov2 dinov2/configs/train/vitl14.yaml"),
        "model.layer_scale": (1e-5, "facebookresearch/dinov2 dinov2/configs/ssl_default_config.yaml"),
    },
}


def _value(cfg, key: str):
    """The resolved value ``key`` names (see OFFICIAL)."""
    parts = key.split(".")
    if parts[0] == "derived":
        d = derive(cfg, IMAGENET_TRAIN)
        return {"lr": d.lr, "min_lr": d.lr * cfg.optim.min_lr_ratio}[parts[1]]
    if parts[:2] == ["aug", "num_views"]:
        return len(cfg.aug.resolved_views())
    if parts[:2] == ["aug", "views"]:
        return getattr(cfg.aug.resolved_views()[int(parts[2])], parts[3])
    node = cfg
    for p in parts:
        node = getattr(node, p)
    return node


def test_every_imagenet_recipe_has_a_table():
    shipped = {p.stem for p in IMAGENET.glob("*.yaml") if not p.stem.startswith("_")}
    assert shipped == set(OFFICIAL), f"recipes without a table: {shipped - set(OFFICIAL)}; stale: {set(OFFICIAL) - shipped}"


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipe_matches_its_official_values(recipe):
    cfg = load_config(f"imagenet/{recipe}")
    wrong = []
    for key, (want, source) in OFFICIAL[recipe].items():
        got = _value(cfg, key)
        same = got == pytest.approx(want, rel=1e-4) if isinstance(want, float) else got == want
        if not same:
            wrong.append(f"{key} = {got!r}, official {want!r} ({source})")
    assert not wrong, f"{recipe}:\n  " + "\n  ".join(wrong)


def test_every_recipe_value_cites_its_source():
    """Every hyper-parameter line of a recipe (model, method, optim, train) carries a comment: its
    source, or why it differs. ``name`` and ``backbone`` say what they are; the base holds fastssl's
    own settings (data paths, precision, logging), not papers' values."""
    bare = []
    for p in sorted(IMAGENET.glob("*.yaml")):
        if p.stem.startswith("_"):
            continue
        section = None
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line and not line.startswith((" ", "#")):
                section = line.split(":")[0]
            elif (section in ("model", "method", "optim", "train") and line.startswith("  ") and ":" in line
                  and line.split(":")[0].strip() not in ("name", "backbone") and "#" not in line):
                bare.append(f"{p.name}:{n}: {line.strip()}")
    assert not bare, "recipe values without a source comment:\n" + "\n".join(bare)
