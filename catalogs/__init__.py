"""Provider profiles (one YAML file per STAC provider), shipped as the data package ``ndvi_scale.catalogs``.

Read them with :func:`ndvi_scale.profiles.list_profiles` / :func:`ndvi_scale.profiles.get_profile`.
"""
