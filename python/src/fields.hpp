// The tensor fields of every op's argument struct, each named once: F(field) for a TensorView,
// L(field) for a list of views (std::span<const TensorView>). The bindings (bind_ops.cpp) fill the structs
// from Python keyword arguments through these tables.
#pragma once

#define MHC_FIELDS_PreForward(F, L) F(x) F(fn) F(base) F(scale) F(layer_input) F(h_pre) F(h_post) F(comb) F(mixes) F(rstd)
#define MHC_FIELDS_PreBackward(F, L)                                                                       \
  F(x) F(fn) F(base) F(scale) F(mixes) F(rstd) F(grad_layer_input) F(grad_h_pre) F(grad_h_post) F(grad_comb)   \
  F(grad_x_accum) F(grad_x) F(grad_fn) F(grad_base) F(grad_scale) F(workspace)
#define MHC_FIELDS_PostForward(F, L) F(x) F(y) F(h_post) F(comb) F(x_next)
#define MHC_FIELDS_PostBackward(F, L) \
  F(grad_x_next) F(x) F(y) F(h_post) F(comb) F(grad_x) F(grad_y) F(grad_h_post) F(grad_comb)
#define MHC_FIELDS_PostPreForward(F, L)                                                                    \
  F(x) F(y) F(h_post) F(comb) F(fn) F(base) F(scale) F(x_next) F(layer_input) F(h_pre) F(h_post_next)         \
  F(comb_next) F(mixes) F(rstd)
#define MHC_FIELDS_SinkhornForward(F, L) F(logits) F(comb)
#define MHC_FIELDS_SinkhornBackward(F, L) F(logits) F(grad_comb) F(grad_logits)
#define MHC_FIELDS_ExpandForward(F, L) F(x) F(out)
#define MHC_FIELDS_ExpandBackward(F, L) F(grad_out) F(grad_x)
#define MHC_FIELDS_HeadForward(F, L) F(x) F(fn) F(base) F(scale) F(out) F(weights) F(mixes) F(rstd)
#define MHC_FIELDS_HeadBackward(F, L)                                                                      \
  F(x) F(fn) F(base) F(scale) F(mixes) F(rstd) F(grad_out) F(grad_weights) F(grad_x) F(grad_fn) F(grad_base)   \
  F(grad_scale) F(workspace)
#define MHC_FIELDS_ResidualAddAggForward(F, L) F(x) F(res) F(h_pre) F(x_out) F(agg)
#define MHC_FIELDS_ResidualAddAggBackward(F, L) F(grad_x_out) F(grad_agg) F(x_out) F(h_pre) F(grad_sum) F(grad_h_pre)
#define MHC_FIELDS_ProjectLogitsForward(F, L) F(logits) F(weights)
#define MHC_FIELDS_ProjectLogitsBackward(F, L) F(logits) F(weights) F(grad_weights) F(grad_logits)
#define MHC_FIELDS_HistoryMixForward(F, L) F(x) L(states) F(weights) F(gate) F(out)
#define MHC_FIELDS_HistoryMixBackward(F, L) \
  F(grad_out) L(states) F(weights) F(gate) F(grad_weights) F(grad_gate) L(grad_states) F(workspace)
#define MHC_FIELDS_HistorySkipForward(F, L) F(x) L(states) F(logits) F(gate) F(out) F(weights)
#define MHC_FIELDS_HistorySkipBackward(F, L)                                                               \
  F(grad_out) L(states) F(logits) F(weights) F(gate) F(grad_logits) F(grad_gate) L(grad_states) F(workspace)
