"""amint_dist.data"""
