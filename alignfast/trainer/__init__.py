"""(being built in the founding sprint)"""
