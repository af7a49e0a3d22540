"""containers/torchzip"""
