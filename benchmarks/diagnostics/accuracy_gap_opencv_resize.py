# Diagnostic (issue 12 accuracy gap): ffcv crops resized by OpenCV (ffcv's resize_crop) instead of our area resize.
import sys
from fastssl.pipelines import ffcv_backend as F
_init = F.FFCVLoader.__init__
def init(self, *a, **kw):
    kw["area_resize"] = False
    _init(self, *a, **kw)
F.FFCVLoader.__init__ = init
import fastssl.train as T
sys.exit(T.main(['--config', 'configs/demo/simclr.yaml', 'train.out_dir=/tmp/exp_runs', 'train.resume=false',
                 'train.progress=false', 'eval.every_epochs=0'] + sys.argv[1:]))
