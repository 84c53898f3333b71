# Diagnostic (issue 12 accuracy gap): the cv2 photometric path with torchvision's per-image random jitter order.
import sys, random
import numpy as np
from fastssl.pipelines import augment_cpu as A

def augment_image(x, p, ksize):
    cv2 = A._cv2()
    if p["jitter"]:
        def br(x): return cv2.addWeighted(x, p["brightness"], x, 0.0, 0.0)
        def co(x):
            c = p["contrast"]; m = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
            return cv2.addWeighted(x, c, x, 0.0, (1.0 - c) * m)
        def sa(x):
            s = p["saturation"]; g = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            return cv2.addWeighted(x, s, g, 1.0 - s, 0.0)
        def hu(x):
            shift = int(round(p["hue"] * 256.0)) % 256
            if not shift: return x
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
            hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + shift) % 256).astype(np.uint8))
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        ops = [br, co, sa, hu]
        random.Random(hash((p["brightness"], p["hue"]))).shuffle(ops)
        for op in ops: x = op(x)
    if p["gray"]:
        x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return x

A.augment_image = augment_image
import fastssl.train as T
sys.exit(T.main(['--config', 'configs/demo/simclr.yaml', 'train.out_dir=/tmp/exp_runs', 'train.resume=false',
                 'train.progress=false', 'eval.every_epochs=0'] + sys.argv[1:]))
