"""amint_dist.train"""
