"""Vision at real scale: image datasets, views cut from the original image, the model's own preprocessing,
and timm / torchvision / transformers image models (``torchvision``, ``timm`` and ``pillow`` are the
optional extra ``pip install 'kdcache[vision]'``)."""
