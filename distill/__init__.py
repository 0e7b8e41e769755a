"""Explanation-guided knowledge distillation: data, WRN models, Lightning modules, harness."""
