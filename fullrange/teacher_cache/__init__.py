"""Teacher-logit cache: the teacher's top-k logits per (augmentation view, training sample),
computed once (build) and read by any number of student runs (reader). Format: .layout;
what a record holds and how the KD target is rebuilt from it: .records."""
from .build import build_teacher_cache
from .layout import DEFAULT_CHUNK, cache_spec, views_needed
from .reader import CacheCorrupt, TeacherCache
from .records import compress_logits, effective_k, rebuild_logits, record_dtype

__all__ = ["build_teacher_cache", "DEFAULT_CHUNK", "cache_spec", "views_needed", "CacheCorrupt", "TeacherCache",
           "compress_logits", "effective_k", "rebuild_logits", "record_dtype"]
