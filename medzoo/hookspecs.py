"""Hook specifications: what a medzoo plugin can provide. Each is a collector given a ``register`` callback."""
import pluggy

hookspec = pluggy.HookspecMarker("medzoo")
hookimpl = pluggy.HookimplMarker("medzoo")


@hookspec
def register_recipes(register):
    """Register Recipe objects: register(recipe, aliases=())."""


@hookspec
def register_base_models(register):
    """Register BaseModel objects: register(base_model)."""


@hookspec
def register_datasets(register):
    """Register DatasetSpec objects: register(dataset)."""


@hookspec
def register_data_formats(register):
    """Register DataFormat objects: register(data_format)."""


@hookspec
def register_tuning_methods(register):
    """Register TuningMethod objects: register(tuning_method)."""


@hookspec
def register_hardware_profiles(register):
    """Register HardwareProfile objects: register(profile)."""


@hookspec
def register_prompt_templates(register):
    """Register PromptTemplate objects: register(template)."""
