"""fileio"""
