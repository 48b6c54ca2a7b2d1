"""amint_dist.audit"""
