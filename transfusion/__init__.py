from transfusion.layout import AttentionLayout

__all__ = ["AttentionLayout"]
