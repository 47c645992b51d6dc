"""torch.hub entry points: one per model name of rope_vit.py and swin_rope.py.

    import torch
    model = torch.hub.load('path/to/this/clone', 'rope_mixed_deit_small_patch16_LS',
                           source='local', pretrained=True)
    # or straight from GitHub: torch.hub.load('<owner>/<repo>', 'rope_mixed_deit_small_patch16_LS', pretrained=True)

Every entry takes the keyword arguments of its module's ``create_model``: ``pretrained=True``
loads the released weights strictly (downloaded once into torch.hub's cache), and any config
field overrides (``num_classes``, ``img_size``, ``window_size``, ...). Size names such as
``vit_small`` or ``swin_tiny`` take ``pe=``. ``torch.hub.list`` names them all.
"""
import rope_vit as _rope_vit
import swin_rope as _swin_rope

dependencies = ['torch']


def _entry_point(module, name):
    def entry(pretrained: bool = False, **kwargs):
        return module.create_model(name, pretrained=pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    released = 'pretrained=True loads the released weights' if name in module.PRETRAINED_URLS \
        else 'no released weights (pretrained=True is an error)'
    entry.__doc__ = f'{module.__name__}.create_model({name!r}, pretrained=..., **kwargs): {released}.'
    return entry


for _module in (_rope_vit, _swin_rope):
    for _name in _module.list_models():
        globals()[_name] = _entry_point(_module, _name)
