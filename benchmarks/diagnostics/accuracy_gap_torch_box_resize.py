# Diagnostic (issue 12 accuracy gap): the torch back-end with PIL's BOX (area) resampling instead of
# its antialiased BILINEAR (a triangle filter as wide as the downscale), i.e. the filter the ffcv
# path uses. Run with data.backend=torch data.train=FOLDER data.val=FOLDER.
import sys

from PIL import Image

Image.BILINEAR = Image.Resampling.BOX  # read by pipelines/torch_backend.py at call time (forked workers inherit)
import fastssl.train as T  # noqa: E402

sys.exit(T.main(['--config', 'configs/demo/simclr.yaml', 'train.out_dir=/tmp/acc/runs', 'train.resume=false',
                 'train.progress=false', 'eval.every_epochs=0'] + sys.argv[1:]))
