//! Guest images: build the default image, register user images.
