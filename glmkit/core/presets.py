"""Named model shapes. Each entry is the published config.json, translated to GLMConfig fields."""

# What the four published original-GLM configs share (glmkit.core.config._from_thudm_glm reads the same).
_ORIGINAL_GLM = dict(
    max_seq_len=1024, norm="layernorm", norm_eps=1e-5, residual="prenorm", mlp="gelu_erf", qkv_layout="grouped",
    rope="none", position_embedding="learned_2d", attention="causal", masked_row="uniform", tie_word_embeddings=True,
    bos_token_id=None, eos_token_id=None, pad_token_id=None, mask_token_id=None, gmask_token_id=None, family="glm",
    torch_dtype="float32",
)

PRESETS: dict[str, dict] = {
    # https://huggingface.co/THUDM/chatglm-6b/blob/main/config.json
    "chatglm-6b": dict(
        vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32, ffn_hidden_size=16384, max_seq_len=2048,
        norm="layernorm", norm_eps=1e-5, residual="deepnorm", alpha_num_layers=28, mlp="gelu", qkv_layout="per_head",
        rope="2d", rope_fp16="table", attention="prefix_lm", family="chatglm", torch_dtype="float16",
    ),
    # https://huggingface.co/THUDM/chatglm2-6b/blob/main/config.json
    "chatglm2-6b": dict(
        vocab_size=65024, hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2, head_dim=128,
        ffn_hidden_size=13696, max_seq_len=32768, norm="rmsnorm", norm_eps=1e-5, residual="prenorm", mlp="swiglu",
        qkv_bias=True, proj_bias=False, mlp_bias=False, qkv_layout="grouped", rope="half_interleaved",
        attention="causal", bos_token_id=None, eos_token_id=2, pad_token_id=0, mask_token_id=None,
        gmask_token_id=None, family="chatglm2", torch_dtype="float16",
    ),
    # https://huggingface.co/THUDM/chatglm3-6b/blob/main/config.json
    "chatglm3-6b": dict(
        vocab_size=65024, hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2, head_dim=128,
        ffn_hidden_size=13696, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, residual="prenorm", mlp="swiglu",
        qkv_bias=True, proj_bias=False, mlp_bias=False, qkv_layout="grouped", rope="half_interleaved",
        attention="causal", bos_token_id=None, eos_token_id=2, pad_token_id=0, mask_token_id=None,
        gmask_token_id=None, family="chatglm2", torch_dtype="float16",
    ),
    # glmkit's bundled model (glmkit/assets/glm-tiny; configs/glm-tiny.yaml, scripts/train_glm_tiny.sh): the
    # ChatGLM-6B architecture at toy size, with its own 10240-id ChatGLM-6B-layout tokenizer.
    "glm-tiny": dict(
        vocab_size=10240, hidden_size=192, num_layers=4, num_heads=3, ffn_hidden_size=768, max_seq_len=1024,
        norm="layernorm", norm_eps=1e-5, residual="deepnorm", alpha_num_layers=28, mlp="gelu", qkv_layout="per_head",
        rope="2d", rope_fp16="table", attention="prefix_lm", bos_token_id=9900, eos_token_id=9901, pad_token_id=3,
        mask_token_id=9896, gmask_token_id=9897, family="chatglm", torch_dtype="float32",
    ),
    # THUDM's original GLM (ACL 2022), hub code `modeling_glm.py`: https://huggingface.co/THUDM/glm-large-chinese,
    # glm-2b, glm-10b, glm-10b-chinese (config.json: num_layers, hidden_size, num_attention_heads, max_sequence_length,
    # vocab_size; the 2B's model card says 36 layers / 4096 / 64 heads, its config.json and THUDM/GLM's
    # model_blocklm_2B.sh say 2048 / 32). Tables of max_seq_len + 1 rows; fp32 as transformers loads them.
    "glm-large-chinese": dict(_ORIGINAL_GLM, vocab_size=50048, hidden_size=1024, num_layers=24, num_heads=16,
                              ffn_hidden_size=4096),
    "glm-2b": dict(_ORIGINAL_GLM, vocab_size=50304, hidden_size=2048, num_layers=36, num_heads=32,
                   ffn_hidden_size=8192),
    "glm-10b": dict(_ORIGINAL_GLM, vocab_size=50304, hidden_size=4096, num_layers=48, num_heads=64,
                    ffn_hidden_size=16384),
    "glm-10b-chinese": dict(_ORIGINAL_GLM, vocab_size=50048, hidden_size=4096, num_layers=48, num_heads=64,
                            ffn_hidden_size=16384),
    # GLM-130B: THUDM/GLM-130B configs/model_glm_130b.sh (70 layers, 12288, 96 heads, inner 32768, vocab 150528, seq
    # 2048, fp16, 8-way tensor parallel), SAT 0.2.x GLM130B (DeepNorm with GeGLU, 1-D rotary over the whole head,
    # output tied to the word embeddings), icetk-glm-130B command ids ([MASK] 150000 ... eop 150005, eos 20002).
    "glm-130b": dict(
        vocab_size=150528, hidden_size=12288, num_layers=70, num_heads=96, ffn_hidden_size=32768, max_seq_len=2048,
        norm="layernorm", norm_eps=1e-5, residual="deepnorm", alpha_num_layers=None, mlp="geglu",
        qkv_layout="per_head", rope="1d", rope_fp16="table", attention="prefix_lm", masked_row="uniform",
        tie_word_embeddings=True, bos_token_id=150004, eos_token_id=[150005, 20002], pad_token_id=0,
        mask_token_id=150000, gmask_token_id=150001, smask_token_id=150002, family="glm130b", torch_dtype="float16",
    ),
    # https://huggingface.co/THUDM/glm-4-9b-chat/blob/main/config.json (rope_ratio 500 -> base 5e6)
    "glm-4-9b-chat": dict(
        vocab_size=151552, hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2, head_dim=128,
        ffn_hidden_size=13696, max_seq_len=131072, norm="rmsnorm", norm_eps=1.5625e-7, residual="prenorm",
        mlp="swiglu", qkv_bias=True, proj_bias=False, mlp_bias=False, qkv_layout="grouped", rope="half_interleaved",
        rope_base=5e6, attention="causal", bos_token_id=None, eos_token_id=[151329, 151336, 151338],
        pad_token_id=151329, mask_token_id=None, gmask_token_id=None, family="glm4", torch_dtype="bfloat16",
    ),
}


# The newer generations, as their published config.json files give them (read by GLMConfig.from_hf_config, so a
# preset is exactly what loading the checkpoint's config gives). Sources: zai-org/GLM-4.5 and GLM-4.5-Air
# config.json (NVIDIA-NeMo/Megatron-Bridge docs/models/llm/glm45.md and THUDM/slime's glm4.5 model scripts give
# the same shapes), zai-org/GLM-4.7-Flash config.json.
_GLM45_COMMON = dict(
    model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], vocab_size=151552, head_dim=128,
    num_key_value_heads=8, num_attention_heads=96, partial_rotary_factor=0.5, rope_theta=1000000,
    max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=True, n_shared_experts=1,
    num_experts_per_tok=8, n_group=1, topk_group=1, norm_topk_prob=True, num_nextn_predict_layers=1,
    tie_word_embeddings=False, eos_token_id=[151329, 151336, 151338], pad_token_id=151329, torch_dtype="bfloat16",
)
HF_PRESETS: dict[str, dict] = {
    # GLM-4.5 (355B-A32B): 92 layers, the first 3 dense, 160 routed experts, QK-norm
    "glm-4.5": dict(_GLM45_COMMON, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                    num_hidden_layers=92, first_k_dense_replace=3, n_routed_experts=160, routed_scaling_factor=2.5,
                    use_qk_norm=True),
    # GLM-4.5-Air (106B-A12B): 46 layers, the first dense, 128 routed experts
    "glm-4.5-air": dict(_GLM45_COMMON, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                        num_hidden_layers=46, first_k_dense_replace=1, n_routed_experts=128,
                        routed_scaling_factor=1.0, use_qk_norm=False),
    # GLM-4.7-Flash (30B-A3B): latent attention, 47 layers, the first dense, 64 routed experts
    "glm-4.7-flash": dict(
        model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"], vocab_size=154880, hidden_size=2048,
        intermediate_size=10240, moe_intermediate_size=1536, num_hidden_layers=47, num_attention_heads=20,
        num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
        v_head_dim=256, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True, partial_rotary_factor=1.0,
        rope_theta=1000000, max_position_embeddings=202752, rms_norm_eps=1e-5, attention_bias=False,
        num_nextn_predict_layers=1, tie_word_embeddings=False, eos_token_id=[154820, 154827, 154829],
        pad_token_id=154820, dtype="bfloat16"),
}
