"""amint_dist.models"""
