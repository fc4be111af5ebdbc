// An input read element by element, from a storage buffer or (on CPU adapters whose
// calibration prefers it, see src/gpu/texture.rs) an r32float texture holding element `i` at
// (i mod 2^LOG2, i / 2^LOG2). src/ops fills in the name and binding per kernel input:
// `load_NAME(i)` returns element `i`. The `_vec4` sections read vec4 number `i` likewise,
// from an array of vec4s or an rgba32float texture.

//- storage
@group(0) @binding({{BINDING}}) var<storage, read> {{NAME}}: array<f32>;
fn load_{{NAME}}(i: u32) -> f32 { return {{NAME}}[i]; }

//- texture
@group(0) @binding({{BINDING}}) var {{NAME}}: texture_2d<f32>;
fn load_{{NAME}}(i: u32) -> f32 {
    return textureLoad({{NAME}}, vec2<u32>(i & {{MASK}}u, i >> {{LOG2}}u), 0).x;
}

//- storage_vec4
@group(0) @binding({{BINDING}}) var<storage, read> {{NAME}}: array<vec4<f32>>;
fn load_{{NAME}}(i: u32) -> vec4<f32> { return {{NAME}}[i]; }

//- texture_vec4
@group(0) @binding({{BINDING}}) var {{NAME}}: texture_2d<f32>;
fn load_{{NAME}}(i: u32) -> vec4<f32> {
    return textureLoad({{NAME}}, vec2<u32>(i & {{MASK}}u, i >> {{LOG2}}u), 0);
}
