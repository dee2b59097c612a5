"""Head geometry: template mesh + UV atlas, UV-space maps, capture renderer (FiCA Sec. 2.1-2.3).

Modules: `template` (HeadTemplate, make_head_template, pose_vertices), `procedural` and
`blendshapes` (how the procedural head is built), `obj` (user OBJ templates), `uvmaps` (UV
rasterization, position/normal maps, Laplacian, sampling), `raster` (the shared JAX z-buffer),
`capture` (Camera, render_capture, project_points), `unwrap` (unwrap_partial: pixels -> partial
UV maps), `template_store` (templates as data: stored with datasets and exports, named by key),
`expression_pca` (a linear expression space fitted to tracked meshes).
"""
