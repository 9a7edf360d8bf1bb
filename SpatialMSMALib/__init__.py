"""SpatialMSMALib: the Qt-free core of SpatialMSMA (I/O, preprocessing, cohort, metrics)."""

__version__ = "0.1.0"
