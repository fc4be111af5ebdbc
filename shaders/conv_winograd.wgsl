// Winograd F(2×2, 3×3) for 3×3 convolutions at stride 1 (Lavin & Gray, 2015): each 2×2 block
// of outputs comes from a 4×4 input tile, and the 36 multiplies per block and channel pair of
// direct summation become 16 elementwise products in the transformed domain, which for all
// channels are 16 matrix products. src/ops/conv_winograd.rs runs:
//   weights: U[ξ][o][c] = (G g Gᵀ)[ξ]                  one invocation per (o, c)
//   input:   V[ξ][c][t] = (Bᵀ d B)[ξ]                  one invocation per (image, c, tile)
//   the batched matmul M[ξ] = U[ξ] · V[ξ]             (ops/matmul.rs)
//   output:  y = act(Aᵀ M A + bias)                   one invocation per (image, o, tile)
// with ξ the 16 points of the 4×4 tile. G holds halves, Bᵀ and Aᵀ ±1, so the transforms add
// little rounding of their own. Tiles past the output's last row or column read padding and
// are not stored, so any OH, OW works; the layer's shape comes as `override` constants.

override C: u32;
override H: u32;
override W: u32;
override O: u32;
override OH: u32;
override OW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
override ACT: u32 = 0u;
override HAS_BIAS: u32 = 0u;
// 1: the weights of the input gradient: filter o, channel c read w[c][o] rotated by 180°.
override FLIP: u32 = 0u;

// Tiles per image: rows, columns.
fn tiles_h() -> u32 { return (OH + 1u) / 2u; }
fn tiles_w() -> u32 { return (OW + 1u) / 2u; }

struct Params {
    images: u32, first_image: u32, total: u32, slope: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

// Row i of a transformed 4×4 tile into dst laid out [16 points][…]: point (i, j) at
// (i·4 + j)·stride + at.
fn store_point_row(i: u32, row: array<f32, 4>, stride: u32, at: u32) {
    for (var j = 0u; j < 4u; j++) {
        dst[(i * 4u + j) * stride + at] = row[j];
    }
}

// The 16 points of one tile from src laid out [16 points][…]: point (i, j) at
// (i·4 + j)·stride + at.
fn load_points(stride: u32, at: u32) -> array<array<f32, 4>, 4> {
    var points: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            points[i][j] = src[(i * 4u + j) * stride + at];
        }
    }
    return points;
}

// The 2×2 block of outputs that invocation `index` over [images][O][tiles] handles: its
// filter, its column in M or dM ([16][O][images·tiles], points `stride` apart), its first
// row and column, and its output plane in y or dy.
struct Block {
    o: u32, at: u32, stride: u32, oy: u32, ox: u32, plane: u32,
}

fn output_block(index: u32) -> Block {
    let tiles = tiles_h() * tiles_w();
    let tile = index % tiles;
    let o = (index / tiles) % O;
    let image = index / (tiles * O);
    let columns = p.images * tiles;
    return Block(
        o,
        o * columns + image * tiles + tile,
        O * columns,
        tile / tiles_w() * 2u,
        tile % tiles_w() * 2u,
        ((p.first_image + image) * O + o) * OH * OW,
    );
}

// U = G g Gᵀ for filter o, channel c: dst = U [16][O][C].
@compute @workgroup_size(WORKGROUP)
fn weights(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let o = index / C;
    let c = index % C;
    var g: array<array<f32, 3>, 3>;
    for (var ky = 0u; ky < 3u; ky++) {
        for (var kx = 0u; kx < 3u; kx++) {
            if FLIP == 1u {
                g[ky][kx] = src[((c * O + o) * 3u + 2u - ky) * 3u + 2u - kx];
            } else {
                g[ky][kx] = src[((o * C + c) * 3u + ky) * 3u + kx];
            }
        }
    }
    // G g: 4×3, with G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1].
    var gg: array<array<f32, 3>, 4>;
    for (var j = 0u; j < 3u; j++) {
        gg[0][j] = g[0][j];
        gg[1][j] = 0.5 * (g[0][j] + g[1][j] + g[2][j]);
        gg[2][j] = 0.5 * (g[0][j] - g[1][j] + g[2][j]);
        gg[3][j] = g[2][j];
    }
    // (G g) Gᵀ: 4×4.
    for (var i = 0u; i < 4u; i++) {
        let row = array<f32, 4>(
            gg[i][0],
            0.5 * (gg[i][0] + gg[i][1] + gg[i][2]),
            0.5 * (gg[i][0] - gg[i][1] + gg[i][2]),
            gg[i][2],
        );
        store_point_row(i, row, O * C, o * C + c);
    }
}

// V = Bᵀ d B for the 4×4 tile of channel c at tile t: dst = V [16][C][images·tiles].
@compute @workgroup_size(WORKGROUP)
fn input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let tiles = tiles_h() * tiles_w();
    let tile = index % tiles;
    let c = (index / tiles) % C;
    let image = index / (tiles * C);
    let y0 = i32(tile / tiles_w() * 2u) - i32(PAD_TOP);
    let x0 = i32(tile % tiles_w() * 2u) - i32(PAD_LEFT);
    let plane = ((p.first_image + image) * C + c) * H * W;
    var d: array<array<f32, 4>, 4>;
    for (var i = 0; i < 4; i++) {
        for (var j = 0; j < 4; j++) {
            let y = y0 + i;
            let x = x0 + j;
            var v = 0.0;
            if y >= 0 && y < i32(H) && x >= 0 && x < i32(W) { v = src[plane + u32(y) * W + u32(x)]; }
            d[i][j] = v;
        }
    }
    // Bᵀ d: rows, with Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
    var bd: array<array<f32, 4>, 4>;
    for (var j = 0u; j < 4u; j++) {
        bd[0][j] = d[0][j] - d[2][j];
        bd[1][j] = d[1][j] + d[2][j];
        bd[2][j] = d[2][j] - d[1][j];
        bd[3][j] = d[1][j] - d[3][j];
    }
    let columns = p.images * tiles;
    let at = c * columns + image * tiles + tile;
    for (var i = 0u; i < 4u; i++) {
        let row = array<f32, 4>(
            bd[i][0] - bd[i][2],
            bd[i][1] + bd[i][2],
            bd[i][2] - bd[i][1],
            bd[i][1] - bd[i][3],
        );
        store_point_row(i, row, C * columns, at);
    }
}

// y = act(Aᵀ m A + bias) for filter o at tile t, m = M [16][O][images·tiles]: dst = y's images
// from first_image on.
@compute @workgroup_size(WORKGROUP)
fn output(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = output_block(index);
    let m = load_points(block.stride, block.at);
    // Aᵀ m: 2×4, with Aᵀ = [1 1 1 0; 0 1 -1 -1].
    var am: array<array<f32, 4>, 2>;
    for (var j = 0u; j < 4u; j++) {
        am[0][j] = m[0][j] + m[1][j] + m[2][j];
        am[1][j] = m[1][j] - m[2][j] - m[3][j];
    }
    var b = 0.0;
    if HAS_BIAS == 1u { b = bias[block.o]; }
    for (var i = 0u; i < 2u; i++) {
        let row = array<f32, 2>(am[i][0] + am[i][1] + am[i][2], am[i][1] - am[i][2] - am[i][3]);
        for (var j = 0u; j < 2u; j++) {
            if block.oy + i < OH && block.ox + j < OW {
                let y = block.plane + (block.oy + i) * OW + block.ox + j;
                dst[y] = activate(row[j] + b, ACT, p.slope);
            }
        }
    }
}

// The weight gradient (forward problem only). With dU[ξ][o][c] = Σ_t (A dy_t Aᵀ)[ξ][o] ·
// V_t[ξ][c] (a batched matmul over the tiles t) the gradient of g is Gᵀ dU G:
//   output_grad:  dM[ξ][o][t] = (A dy_t Aᵀ)[ξ]       one invocation per (image, o, tile)
//   weights_grad: dW[o][c] = Gᵀ dU[o][c] G          one invocation per (o, c)
// dy_t is the tile's 2×2 block of dy, zero past the output's last row or column.

// src = dy [N][O][OH][OW], dst = dM [16][O][images·tiles].
@compute @workgroup_size(WORKGROUP)
fn output_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = output_block(index);
    var g: array<array<f32, 2>, 2>;
    for (var i = 0u; i < 2u; i++) {
        for (var j = 0u; j < 2u; j++) {
            var v = 0.0;
            if block.oy + i < OH && block.ox + j < OW {
                v = src[block.plane + (block.oy + i) * OW + block.ox + j];
            }
            g[i][j] = v;
        }
    }
    // A g: 4×2, with A = [1 0; 1 1; 1 -1; 0 -1].
    var ag: array<array<f32, 2>, 4>;
    for (var j = 0u; j < 2u; j++) {
        ag[0][j] = g[0][j];
        ag[1][j] = g[0][j] + g[1][j];
        ag[2][j] = g[0][j] - g[1][j];
        ag[3][j] = -g[1][j];
    }
    for (var i = 0u; i < 4u; i++) {
        let row = array<f32, 4>(ag[i][0], ag[i][0] + ag[i][1], ag[i][0] - ag[i][1], -ag[i][1]);
        store_point_row(i, row, block.stride, block.at);
    }
}

// src = dU [16][O][C], dst = dW [O][C][3][3].
@compute @workgroup_size(WORKGROUP)
fn weights_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let o = index / C;
    let c = index % C;
    let u = load_points(O * C, o * C + c);
    // Gᵀ u: 3×4, with Gᵀ = [1 ½ ½ 0; 0 ½ -½ 0; 0 ½ ½ 1].
    var gu: array<array<f32, 4>, 3>;
    for (var j = 0u; j < 4u; j++) {
        gu[0][j] = u[0][j] + 0.5 * (u[1][j] + u[2][j]);
        gu[1][j] = 0.5 * (u[1][j] - u[2][j]);
        gu[2][j] = 0.5 * (u[1][j] + u[2][j]) + u[3][j];
    }
    for (var i = 0u; i < 3u; i++) {
        let row = array<f32, 3>(
            gu[i][0] + 0.5 * (gu[i][1] + gu[i][2]),
            0.5 * (gu[i][1] - gu[i][2]),
            0.5 * (gu[i][1] + gu[i][2]) + gu[i][3],
        );
        for (var j = 0u; j < 3u; j++) {
            dst[((o * C + c) * 3u + i) * 3u + j] = row[j];
        }
    }
}
