"""Test oracles for ndvi-scale (odc-stac's ``testing`` style): not used by the product.

:mod:`ndvi_scale.testing.reference` holds the stage-by-stage reference implementations; the synthetic sample's
analytic truth is :class:`ndvi_scale.sample.Truth`.
"""
