// Input sources for shaders/conv_direct.wgsl, one chosen per pipeline: `load_x(i)` returns
// element `i` of the dense input.

//- storage
@group(0) @binding(1) var<storage, read> x: array<f32>;
fn load_x(i: u32) -> f32 { return x[i]; }

//- texture
// An r32float texture: element `i` at (i mod TEXTURE_WIDTH, i / TEXTURE_WIDTH), see
// src/gpu/texture.rs.
@group(0) @binding(1) var x: texture_2d<f32>;
const TEXTURE_WIDTH_LOG2: u32 = {{TEXTURE_WIDTH_LOG2}}u;
fn load_x(i: u32) -> f32 {
    let mask = (1u << TEXTURE_WIDTH_LOG2) - 1u;
    return textureLoad(x, vec2<u32>(i & mask, i >> TEXTURE_WIDTH_LOG2), 0).x;
}
