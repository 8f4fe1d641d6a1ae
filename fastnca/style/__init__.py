"""Neural style: VGG16 features (pretrained or the offline fallback), style transfer by pixel
optimisation, image loading/saving and the built-in procedural textures."""
