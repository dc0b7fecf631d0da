"""The bundled presets: the YAML files beside this module, each holding only what differs from the
defaults (`chatbuild.config`). They ship inside the installed package, so `chatbuild finetune tiny-cpu`
and the Build tab find them without the source tree.

    names()        ["guanaco-65b", "guanaco-7b", "guanaco-7b-dpo", "smollm2-persona", "tiny-cpu", "tiny-cpu-dpo"]
    path(name)     the preset's YAML file; an unknown name is a UserError naming the known ones
    values(name)   the preset over the defaults, as {section: {field: value}} (the run's config.yaml shape)
"""

from pathlib import Path

from chatbuild.errors import UserError

DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.yaml"))


def path(name: str) -> Path:
    if name not in names():
        raise UserError(f'preset "{name}" is unknown; pick one of {", ".join(names())}')
    return DIR / f"{name}.yaml"


def values(name: str) -> dict:
    from chatbuild.config import load_config, to_dict

    return to_dict(load_config(path(name)))
