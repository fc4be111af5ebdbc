// Times the two ways a kernel can read a large operand on this adapter: per-lane loads from a
// storage buffer (`storage_reads`) and `textureLoad` from an rgba32float texture
// (`texture_reads`). Each invocation reads LOADS texels at addresses that differ by lane, as
// a matmul's operand reads do. See src/gpu/texture.rs.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var src_texture: texture_2d<f32>;

struct Params { texels: u32, _pad0: u32, _pad1: u32, _pad2: u32 }  // texels: a power of two

const LOADS: u32 = 64u;
const TEXTURE_WIDTH_LOG2: u32 = {{TEXTURE_WIDTH_LOG2}}u;

@compute @workgroup_size(64)
fn storage_reads(@builtin(global_invocation_id) gid: vec3<u32>) {
    var acc = vec4<f32>(0.0);
    var i = gid.x * 7u;
    for (var j = 0u; j < LOADS; j++) {
        acc += src[i & (p.texels - 1u)];
        i += 4099u;
    }
    out[gid.x] = acc;
}

@compute @workgroup_size(64)
fn texture_reads(@builtin(global_invocation_id) gid: vec3<u32>) {
    let mask = (1u << TEXTURE_WIDTH_LOG2) - 1u;
    var acc = vec4<f32>(0.0);
    var i = gid.x * 7u;
    for (var j = 0u; j < LOADS; j++) {
        let at = i & (p.texels - 1u);
        acc += textureLoad(src_texture, vec2<u32>(at & mask, at >> TEXTURE_WIDTH_LOG2), 0);
        i += 4099u;
    }
    out[gid.x] = acc;
}
