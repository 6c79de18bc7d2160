"""The vocabulary every layer shares: errors, sizes, image names and the view contract.

Imports nothing from the rest of ``owm``; every other package may import it.
"""
