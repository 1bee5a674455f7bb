"""Take your model home: a trained adapter as a standard PEFT adapter directory, or merged into its base
as a plain transformers model, with a model card; optionally pushed to the Hugging Face hub.

    python export.py adapter=runs/smollm2_135m-arith/cdpo-seed0/adapter out=exports/cdpo-adapter
    python export.py adapter=runs/smollm2_135m-arith/cdpo-seed0/adapter out=exports/cdpo merge=true
    python export.py adapter=<dir> out=<dir> merge=true push_to=<user>/<repo>

The base is the one the adapter records (an embedded model's hub id loads the embedded copy), or
model=<preset> [model.path=<dir or hub id>]. See cdpo/export.py.
"""
import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from cdpo.cli import run_entry

    run_entry("export.py", lambda: export(cfg))


def export(cfg: DictConfig):
    from cdpo.export import ExportError, export as run_export

    for key in ("adapter", "out"):
        if not cfg.get(key):
            raise ExportError(f"{key}=<dir> is required: python export.py adapter=<adapter dir> out=<new dir> [merge=true]")
    out = run_export(to_absolute_path(str(cfg.adapter)), to_absolute_path(str(cfg.out)), merge=bool(cfg.merge),
                     model=cfg.model.path if cfg.get("model") else None, base_model=cfg.base_model,
                     push_to=cfg.push_to, private=bool(cfg.private), overwrite=bool(cfg.overwrite),
                     dtype=str(cfg.dtype))
    pushed = f" (pushed to {cfg.push_to})" if cfg.push_to else ""
    print(f"exported {'merged model' if cfg.merge else 'adapter'} -> {out}{pushed}")


if __name__ == "__main__":
    main()
