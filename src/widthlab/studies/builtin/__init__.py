"""Built-in study files (package data); `widthlab studies` lists them."""
